//! wasm-bindgen facade.
