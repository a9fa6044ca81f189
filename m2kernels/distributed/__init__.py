"""Distributed contrastive loss over torch.distributed process groups."""
