//! GPU engine (wgpu): WGSL kernels and the Mixtral forward pass.
