"""distcls: distributed training of image classifiers with one code path everywhere."""

__version__ = "0.1.0"
