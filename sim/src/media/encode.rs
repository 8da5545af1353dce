//! PNG, animated PNG and animated WebP writers, and a PNG reader.

use rand::{rngs::StdRng, RngCore, SeedableRng};

use super::{draw::Image, MediaError};

fn color_type(channels: u8) -> Result<png::ColorType, MediaError> {
    match channels {
        3 => Ok(png::ColorType::Rgb),
        4 => Ok(png::ColorType::Rgba),
        other => Err(MediaError::Unsupported(format!("{other} channels"))),
    }
}

/// Encodes one frame as a PNG, with `text` as tEXt chunks (ComfyUI stores
/// the prompt there).
pub fn encode_png(
    image: &Image,
    frame: usize,
    text: &[(&str, String)],
) -> Result<Vec<u8>, MediaError> {
    let data = image
        .frames
        .get(frame)
        .ok_or_else(|| MediaError::Unsupported(format!("no frame {frame}")))?;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
    encoder.set_color(color_type(image.channels)?);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        encoder.add_text_chunk((*key).to_owned(), value.clone())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(data)?;
    writer.finish()?;
    Ok(out)
}

/// Encodes every frame into one animated PNG playing at `fps`.
pub fn encode_apng(
    image: &Image,
    fps: f64,
    text: &[(&str, String)],
) -> Result<Vec<u8>, MediaError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
    encoder.set_color(color_type(image.channels)?);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_animated(image.frames.len() as u32, 0)?;
    encoder.set_frame_delay(1000, (fps.max(0.01) * 1000.0).round() as u16)?;
    for (key, value) in text {
        encoder.add_text_chunk((*key).to_owned(), value.clone())?;
    }
    let mut writer = encoder.write_header()?;
    for frame in &image.frames {
        writer.write_image_data(frame)?;
    }
    writer.finish()?;
    Ok(out)
}

/// Encodes every frame losslessly and wraps them in an animated WebP
/// container (VP8X + ANIM + one ANMF per frame).
pub fn encode_animated_webp(image: &Image, fps: f64) -> Result<Vec<u8>, MediaError> {
    let duration = (1000.0 / fps.max(0.01)).round().min(f64::from(0xff_ffff)) as u32;
    let mut body = Vec::new();
    let has_alpha = image.channels == 4;
    let flags: u8 = 0x02 | if has_alpha { 0x10 } else { 0 };
    let mut vp8x = vec![flags, 0, 0, 0];
    vp8x.extend(u24(image.width - 1));
    vp8x.extend(u24(image.height - 1));
    push_chunk(&mut body, b"VP8X", &vp8x);
    push_chunk(&mut body, b"ANIM", &[0, 0, 0, 0, 0, 0]);
    for frame in &image.frames {
        let still = encode_webp_still(image, frame)?;
        let mut anmf = Vec::new();
        anmf.extend(u24(0));
        anmf.extend(u24(0));
        anmf.extend(u24(image.width - 1));
        anmf.extend(u24(image.height - 1));
        anmf.extend(u24(duration));
        anmf.push(0);
        anmf.extend(still);
        push_chunk(&mut body, b"ANMF", &anmf);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend(b"RIFF");
    out.extend(((body.len() + 4) as u32).to_le_bytes());
    out.extend(b"WEBP");
    out.extend(body);
    Ok(out)
}

/// The frame's image chunks (everything after the RIFF/WEBP header).
fn encode_webp_still(image: &Image, frame: &[u8]) -> Result<Vec<u8>, MediaError> {
    let mut file = Vec::new();
    let color = if image.channels == 4 {
        image_webp::ColorType::Rgba8
    } else {
        image_webp::ColorType::Rgb8
    };
    image_webp::WebPEncoder::new(&mut file).encode(frame, image.width, image.height, color)?;
    Ok(file.get(12..).map(<[u8]>::to_vec).unwrap_or_default())
}

fn u24(value: u32) -> [u8; 3] {
    let b = value.to_le_bytes();
    [b[0], b[1], b[2]]
}

fn push_chunk(out: &mut Vec<u8>, tag: &[u8; 4], data: &[u8]) {
    out.extend(tag);
    out.extend((data.len() as u32).to_le_bytes());
    out.extend(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
}

/// Decodes the first frame of a PNG into 8-bit RGB or RGBA.
pub fn decode_png(bytes: &[u8]) -> Result<Image, MediaError> {
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    let (channels, data) = match info.color_type {
        png::ColorType::Rgb => (3, buf),
        png::ColorType::Rgba => (4, buf),
        png::ColorType::Grayscale => (3, buf.iter().flat_map(|v| [*v, *v, *v]).collect()),
        png::ColorType::GrayscaleAlpha => {
            let data = buf
                .chunks(2)
                .flat_map(|p| [p[0], p[0], p[0], p[1]])
                .collect();
            (4, data)
        }
        png::ColorType::Indexed => {
            return Err(MediaError::Unsupported(
                "indexed png after expansion".into(),
            ))
        }
    };
    Ok(Image {
        width: info.width,
        height: info.height,
        channels,
        frames: vec![data],
    })
}

/// A PNG of noise (incompressible) that encodes to roughly `len` bytes; the
/// preview frames use it to exercise large WebSocket frames.
pub fn noise_png(len: usize, seed: u64) -> Result<Vec<u8>, MediaError> {
    let side = (((len / 3) as f64).sqrt().ceil() as u32).max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; side as usize * side as usize * 3];
    rng.fill_bytes(&mut data);
    let image = Image {
        width: side,
        height: side,
        channels: 3,
        frames: vec![data],
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&image.frames[0])?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::probe;

    fn sample(frames: usize) -> Image {
        let mut image = Image::solid(6, 4, frames, [10, 20, 30]);
        image.frames[0][0] = 200;
        image
    }

    #[test]
    fn png_round_trips() {
        let bytes = encode_png(&sample(1), 0, &[("prompt", "{}".into())]).unwrap();
        let back = decode_png(&bytes).unwrap();
        assert_eq!(back, sample(1));
    }

    #[test]
    fn apng_reports_its_frames() {
        let bytes = encode_apng(&sample(5), 8.0, &[]).unwrap();
        let info = probe(&bytes).unwrap();
        assert_eq!((info.width, info.height, info.frames), (6, 4, 5));
    }

    #[test]
    fn animated_webp_reports_its_frames() {
        let bytes = encode_animated_webp(&sample(3), 16.0).unwrap();
        let info = probe(&bytes).unwrap();
        assert_eq!(
            (info.width, info.height, info.frames, info.format),
            (6, 4, 3, "webp")
        );
    }

    #[test]
    fn noise_png_is_about_the_requested_size() {
        let bytes = noise_png(100_000, 7).unwrap();
        assert!(
            bytes.len() > 90_000 && bytes.len() < 120_000,
            "{}",
            bytes.len()
        );
    }
}
