"""What turns a sample into a training input, in two stages (data/__init__.py states the contract):
per sample in DataLoader workers, for image files only: decode and geometry (images.py; on the GPU:
gpu_decode.py); per batch on the training device, for every dataset: everything else (augment.py: crop,
flip, rotation, the policies of policies.py, erasing, normalization; mix.py: Mixup/CutMix). Every random
choice is keys.py's one hash of (seed, epoch, sample key, stream). pixels.py: the one channel matcher
and the one square resize, used by both stages."""
