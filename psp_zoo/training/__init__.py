"""Training PSPNet as the published checkpoints were trained: recipe, data pipeline, trainer, loop, logs."""
