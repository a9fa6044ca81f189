"""The ops: Triton kernels and launchers (`*_kernels.py`), their torch twins (`*_torch.py`), the block
primitives and custom ops (`clip_loss.py`), and what they share (`tiling.py`)."""
