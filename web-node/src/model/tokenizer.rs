//! `tokenizer.json` through the `tokenizers` crate (built without `onig`, so
//! it also compiles for wasm32), with errors mapped to [`ModelError`].

use super::ModelError;

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// A Hugging Face tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Parse `tokenizer.json` bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        tokenizers::Tokenizer::from_bytes(bytes)
            .map(|inner| Self { inner })
            .map_err(err)
    }

    /// Read a `tokenizer.json` file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, ModelError> {
        let p = path.as_ref();
        let bytes =
            std::fs::read(p).map_err(|e| ModelError::Io(format!("{}: {e}", p.display())))?;
        Self::from_bytes(&bytes)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encode text, adding the special tokens the tokenizer's post-processor
    /// adds (e.g. BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(text, true)
    }

    /// Encode text, with or without the post-processor's special tokens.
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(err)
    }

    /// Decode ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.decode_with(ids, true)
    }

    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner.decode(ids, skip_special).map_err(err)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Serialise back to `tokenizer.json`.
    pub fn to_json(&self) -> Result<String, ModelError> {
        self.inner.to_string(false).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            Tokenizer::from_bytes(b"{nope"),
            Err(ModelError::Tokenizer(_))
        ));
        assert!(matches!(
            Tokenizer::from_bytes(b"{}"),
            Err(ModelError::Tokenizer(_))
        ));
    }
}
