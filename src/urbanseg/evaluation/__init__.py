"""Stage 5, `urbanseg evaluate`: dataset-level scores (`metrics`), the official Cityscapes
scores (`official`), the command (`evaluate`) and its report files (`report`)."""
