//! Deterministic pictures and the file formats the simulators read and write.
//!
//! The simulators must hand out real files, because the daemon stores,
//! hashes, thumbnails and forwards them. Everything here is small and
//! deterministic: the same prompt text and seed always give the same pixels,
//! so tests can compare outputs across runs without keeping golden files.

mod draw;
mod encode;
mod probe;

pub use draw::{blur, invert, pattern, scale, tint_frames, Image};
pub use encode::{decode_png, encode_animated_webp, encode_apng, encode_png, noise_png};
pub use probe::{probe, MediaInfo};

/// A picture could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("png encoding failed")]
    PngEncode(#[from] png::EncodingError),
    #[error("png decoding failed")]
    PngDecode(#[from] png::DecodingError),
    #[error("webp encoding failed")]
    WebpEncode(#[from] image_webp::EncodingError),
    #[error("unsupported picture layout: {0}")]
    Unsupported(String),
}

/// Largest side of any picture the simulators produce, so tests stay quick.
pub const MAX_SIDE: u32 = 256;

/// Shrinks `(width, height)` to fit within [`MAX_SIDE`], keeping the aspect.
pub fn clamp_size(width: u32, height: u32) -> (u32, u32) {
    let (w, h) = (width.max(1), height.max(1));
    let longest = w.max(h);
    if longest <= MAX_SIDE {
        return (w, h);
    }
    let shrink = |side: u32| ((u64::from(side) * u64::from(MAX_SIDE)) / u64::from(longest)) as u32;
    (shrink(w).max(1), shrink(h).max(1))
}
