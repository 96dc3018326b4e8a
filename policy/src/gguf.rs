//! PLACEHOLDER written by the lead so the crate builds; helper-1 replaces this whole file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("gguf import not built yet")]
    NotYet,
}
#[derive(Debug)]
pub struct ImportSummary;
pub fn import_gguf(_: &std::path::Path, _: &std::path::Path) -> Result<ImportSummary, GgufError> {
    Err(GgufError::NotYet)
}
