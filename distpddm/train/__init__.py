"""Training loops: an in-memory loop for arrays (tests, CPU demo); the Ray/DeepSpeed trainer."""
