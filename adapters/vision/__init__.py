"""Image tasks: the frozen vision backbone, image decoding, augmentation and datasets."""
