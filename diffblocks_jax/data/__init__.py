"""Data: sources (TFDS, digits, npz, image folders) → uint8 arrays on the device; augmentation on the device."""
