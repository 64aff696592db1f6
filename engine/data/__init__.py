"""Sample data sets shipped with the workbench (see engine.finetune.data.SAMPLES)."""
