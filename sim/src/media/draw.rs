//! Pixel buffers and the few image operations the ComfyUI nodes need.

use sha2::{Digest, Sha256};

/// A batch of equally sized frames (a batch of stills or a video's frames).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    /// 3 for RGB, 4 for RGBA.
    pub channels: u8,
    /// One tightly packed buffer per frame, row by row.
    pub frames: Vec<Vec<u8>>,
}

impl Image {
    /// A batch of `count` frames filled with one RGB colour.
    pub fn solid(width: u32, height: u32, count: usize, rgb: [u8; 3]) -> Image {
        let frame: Vec<u8> = rgb
            .iter()
            .copied()
            .cycle()
            .take(pixels(width, height) * 3)
            .collect();
        Image {
            width,
            height,
            channels: 3,
            frames: vec![frame; count.max(1)],
        }
    }

    /// Bytes of one frame.
    pub fn frame_len(&self) -> usize {
        pixels(self.width, self.height) * usize::from(self.channels)
    }
}

fn pixels(width: u32, height: u32) -> usize {
    width as usize * height as usize
}

/// Draws an RGB frame whose colours and bands follow from `text` and `seed`.
///
/// A hash picks two colours and a stripe angle; the result looks different
/// for different prompts and identical for identical ones.
pub fn pattern(width: u32, height: u32, text: &str, seed: u64) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    hasher.update(seed.to_be_bytes());
    let digest = hasher.finalize();
    let a = [digest[0], digest[1], digest[2]];
    let b = [digest[3], digest[4], digest[5]];
    let bands = u32::from(digest[6] % 7) + 2;
    let tilt = u32::from(digest[7] % 4);
    let mut out = Vec::with_capacity(pixels(width, height) * 3);
    for y in 0..height {
        for x in 0..width {
            let position = (x + y * tilt) * bands / width.max(1);
            let pick = if position % 2 == 0 { a } else { b };
            let shade = (y * 64 / height.max(1)) as u8;
            out.extend(pick.iter().map(|c| c.saturating_add(shade)));
        }
    }
    out
}

/// Inverts every colour channel, leaving alpha alone, as ImageInvert does.
pub fn invert(image: &Image) -> Image {
    let channels = usize::from(image.channels);
    let frames = image
        .frames
        .iter()
        .map(|frame| {
            frame
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if channels == 4 && i % 4 == 3 {
                        *v
                    } else {
                        255 - v
                    }
                })
                .collect()
        })
        .collect();
    Image {
        frames,
        ..image.clone()
    }
}

/// Resizes every frame; `smooth` picks bilinear over nearest-neighbour.
pub fn scale(image: &Image, width: u32, height: u32, smooth: bool) -> Image {
    let (width, height) = (width.max(1), height.max(1));
    let frames = image
        .frames
        .iter()
        .map(|frame| scale_frame(image, frame, width, height, smooth))
        .collect();
    Image {
        width,
        height,
        channels: image.channels,
        frames,
    }
}

fn scale_frame(image: &Image, frame: &[u8], width: u32, height: u32, smooth: bool) -> Vec<u8> {
    let channels = usize::from(image.channels);
    let mut out = Vec::with_capacity(pixels(width, height) * channels);
    let fx = image.width as f32 / width as f32;
    let fy = image.height as f32 / height as f32;
    for y in 0..height {
        for x in 0..width {
            let sx = ((x as f32 + 0.5) * fx - 0.5).max(0.0);
            let sy = ((y as f32 + 0.5) * fy - 0.5).max(0.0);
            for c in 0..channels {
                let value = if smooth {
                    bilinear(image, frame, sx, sy, c)
                } else {
                    sample(image, frame, sx.round() as u32, sy.round() as u32, c)
                };
                out.push(value);
            }
        }
    }
    out
}

fn sample(image: &Image, frame: &[u8], x: u32, y: u32, c: usize) -> u8 {
    let x = x.min(image.width - 1) as usize;
    let y = y.min(image.height - 1) as usize;
    frame[(y * image.width as usize + x) * usize::from(image.channels) + c]
}

fn bilinear(image: &Image, frame: &[u8], sx: f32, sy: f32, c: usize) -> u8 {
    let (x0, y0) = (sx.floor() as u32, sy.floor() as u32);
    let (dx, dy) = (sx - sx.floor(), sy - sy.floor());
    let p = |x: u32, y: u32| f32::from(sample(image, frame, x, y, c));
    let top = p(x0, y0) * (1.0 - dx) + p(x0 + 1, y0) * dx;
    let bottom = p(x0, y0 + 1) * (1.0 - dx) + p(x0 + 1, y0 + 1) * dx;
    (top * (1.0 - dy) + bottom * dy).round().clamp(0.0, 255.0) as u8
}

/// A 3x3 box blur applied `passes` times (capped, the sim stays cheap).
pub fn blur(image: &Image, passes: u32) -> Image {
    let mut current = image.clone();
    for _ in 0..passes.min(3) {
        let frames = current
            .frames
            .iter()
            .map(|f| box_blur(&current, f))
            .collect();
        current = Image {
            frames,
            ..current.clone()
        };
    }
    current
}

fn box_blur(image: &Image, frame: &[u8]) -> Vec<u8> {
    let channels = usize::from(image.channels);
    let mut out = Vec::with_capacity(frame.len());
    for y in 0..image.height {
        for x in 0..image.width {
            for c in 0..channels {
                let mut sum = 0u32;
                for (ox, oy) in (0..9).map(|i| (i % 3, i / 3)) {
                    let sx = (x + ox).saturating_sub(1);
                    let sy = (y + oy).saturating_sub(1);
                    sum += u32::from(sample(image, frame, sx, sy, c));
                }
                out.push((sum / 9) as u8);
            }
        }
    }
    out
}

/// Makes `count` frames from the first one, each shifted and tinted a little
/// more, so a generated clip visibly moves.
pub fn tint_frames(image: &Image, count: usize) -> Image {
    let first = image.frames.first().cloned().unwrap_or_default();
    let channels = usize::from(image.channels);
    let row = image.width as usize * channels;
    let frames = (0..count.max(1))
        .map(|index| {
            let shift = (index * channels * 2) % row.max(1);
            let mut frame: Vec<u8> = Vec::with_capacity(first.len());
            for line in first.chunks(row.max(1)) {
                frame.extend(line[shift.min(line.len())..].iter());
                frame.extend(line[..shift.min(line.len())].iter());
            }
            for (i, v) in frame.iter_mut().enumerate() {
                if i % channels == 0 {
                    *v = v.saturating_add((index * 6) as u8);
                }
            }
            frame
        })
        .collect();
    Image {
        frames,
        ..image.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_prompt_dependent() {
        assert_eq!(pattern(8, 8, "a cat", 1), pattern(8, 8, "a cat", 1));
        assert_ne!(pattern(8, 8, "a cat", 1), pattern(8, 8, "a dog", 1));
        assert_eq!(pattern(8, 4, "x", 0).len(), 8 * 4 * 3);
    }

    #[test]
    fn invert_keeps_alpha() {
        let image = Image {
            width: 1,
            height: 1,
            channels: 4,
            frames: vec![vec![0, 10, 255, 7]],
        };
        assert_eq!(invert(&image).frames[0], vec![255, 245, 0, 7]);
    }

    #[test]
    fn scale_changes_size() {
        let image = Image::solid(4, 4, 1, [1, 2, 3]);
        let scaled = scale(&image, 2, 3, true);
        assert_eq!(scaled.frames[0].len(), 2 * 3 * 3);
        assert_eq!(&scaled.frames[0][..3], &[1, 2, 3]);
    }
}
