//! Reads size and frame count from PNG/APNG, GIF and WebP files, for the
//! LangFlow visual-narration flow.

/// What a picture or clip file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaInfo {
    pub format: &'static str,
    pub width: u32,
    pub height: u32,
    /// 1 for a still picture.
    pub frames: u32,
}

/// Sniffs the format from the first bytes; `None` for anything unknown.
pub fn probe(bytes: &[u8]) -> Option<MediaInfo> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return probe_png(bytes);
    }
    if bytes.starts_with(b"GIF8") {
        return probe_gif(bytes);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return probe_webp(bytes);
    }
    None
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le24(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 3)?;
    Some(u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16)
}

fn probe_png(bytes: &[u8]) -> Option<MediaInfo> {
    let width = be32(bytes, 16)?;
    let height = be32(bytes, 20)?;
    let mut frames = 1;
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let len = be32(bytes, at)? as usize;
        let tag = bytes.get(at + 4..at + 8)?;
        if tag == b"acTL" {
            frames = be32(bytes, at + 8)?;
            break;
        }
        if tag == b"IDAT" {
            break;
        }
        at += 12 + len;
    }
    Some(MediaInfo {
        format: "png",
        width,
        height,
        frames,
    })
}

fn probe_gif(bytes: &[u8]) -> Option<MediaInfo> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let mut decoder = options.read_info(bytes).ok()?;
    let (width, height) = (u32::from(decoder.width()), u32::from(decoder.height()));
    let mut frames = 0;
    while let Ok(Some(_)) = decoder.next_frame_info() {
        frames += 1;
    }
    Some(MediaInfo {
        format: "gif",
        width,
        height,
        frames: frames.max(1),
    })
}

fn probe_webp(bytes: &[u8]) -> Option<MediaInfo> {
    let mut at = 12;
    let mut size = None;
    let mut frames = 0;
    while at + 8 <= bytes.len() {
        let tag = bytes.get(at..at + 4)?;
        let len = u32::from_le_bytes(bytes.get(at + 4..at + 8)?.try_into().ok()?) as usize;
        let data = at + 8;
        match tag {
            b"VP8X" => size = Some((le24(bytes, data + 4)? + 1, le24(bytes, data + 7)? + 1)),
            b"ANMF" => frames += 1,
            b"VP8L" if size.is_none() => {
                let bits = u32::from_le_bytes(bytes.get(data + 1..data + 5)?.try_into().ok()?);
                size = Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1));
            }
            b"VP8 " if size.is_none() => {
                let w = u32::from(u16::from_le_bytes(
                    bytes.get(data + 6..data + 8)?.try_into().ok()?,
                ));
                let h = u32::from(u16::from_le_bytes(
                    bytes.get(data + 8..data + 10)?.try_into().ok()?,
                ));
                size = Some((w & 0x3fff, h & 0x3fff));
            }
            _ => {}
        }
        at = data + len + len % 2;
    }
    let (width, height) = size?;
    Some(MediaInfo {
        format: "webp",
        width,
        height,
        frames: frames.max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_bytes_are_none() {
        assert_eq!(probe(b"hello"), None);
    }
}
