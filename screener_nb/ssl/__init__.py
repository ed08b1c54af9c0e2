"""Self-supervised pretraining: positive pairs, augmentations, masking and dense losses."""
