"""The smallest run the command-line tests train: a two-level UNet on 16^3 phantoms, two steps."""

TINY_RUN = [
    "data.shape=[16,16,16]",
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.steps=2",
    "training.val_batches=1",
    # The end-of-run report is tested on its own (tests/reports, tests/training/test_train_report.py).
    "run.report=false",
]
