"""Kernel files of the fused backends (triton_l2_softmax.py: the Triton kernels and their launchers).
Nothing here is imported at package import: the backend modules import what they need in load()."""
