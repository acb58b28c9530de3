//! Named file locks (placeholder).
