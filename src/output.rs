//! Worker output (placeholder).
