//! The prepared form of an avatar: each background frame encoded once with restart markers,
//! plus the original pixels of its face region ([`Frame`]), and its file `prepared.fcp` in the
//! bundle, written by `framecast-compositor avatar prepare DIR` so that a cold start is a read,
//! not a decode and re-encode of every frame.
//!
//! The file (little endian): the magic `FCPREP03` (the version is its last two bytes), the
//! encode parameters (quality u8, subsampling u8, restart MCUs u16), a fingerprint of the
//! sources (u64), width, height and frame count (u32 each), a CRC-32 of everything after it
//! (u32), each frame's JPEG length (u32 each), then per frame its JPEG and its region's
//! pixels ([`Pixels`]: YCbCr planes at 4:2:0, packed RGB otherwise; the region follows from
//! the box and the parameters, so it is not stored). Version 01 kept RGB at every
//! subsampling; 02 had no checksum. A file whose version, parameters, fingerprint, sizes,
//! checksum or frame headers disagree with the bundle is not used: the avatar is prepared in
//! memory instead, and the reason logged. It is written to a temporary file and renamed,
//! never half-written.

use crate::encode::{self, Params, Rgb, Subsampling};
use crate::manifest::{FaceBox, BOXES_FILE, MANIFEST_FILE};
use crate::planes::Planes;
use crate::segments::{self, Grid, Layout, Region};
use bytes::Bytes;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The prepared file's name in a bundle.
pub const FILE: &str = "prepared.fcp";
const MAGIC: &[u8; 8] = b"FCPREP03";
/// Bytes of the header a file must share with the bundle: format, parameters, fingerprint,
/// size, count.
const IDENTITY: usize = 8 + 4 + 8 + 12;
/// Bytes before the per-frame JPEG lengths: the identity, then the checksum (CRC-32 of
/// everything after it: the lengths and the frames).
pub const FIXED: usize = IDENTITY + 4;

/// One background frame as the compositor keeps it: read-only, so any number of sessions
/// compose from it at once.
pub struct Frame {
    /// The whole frame, encoded once with the avatar's [`Params`].
    pub jpeg: Bytes,
    /// The CRC-32 of `jpeg`, which names it to a client that keeps it
    /// (`RenderedFrame.background_crc32`).
    pub jpeg_crc: u32,
    pub layout: Layout,
    /// The segment-aligned region holding the face box, and its original pixels.
    pub region: Region,
    pub pixels: Pixels<Bytes>,
}

/// A face region's pixels, in the form its avatar's encode works in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pixels<B> {
    /// Packed RGB: avatars encoded at 4:4:4, 4:2:2 or grey.
    Rgb(B),
    /// YCbCr 4:2:0 planes ([`crate::planes`]), as libjpeg converts the RGB: avatars encoded at
    /// 4:2:0. Faces are blended and encoded here with no colour conversion (half the bytes of
    /// RGB, too).
    Ycc420(B),
}

impl<B: AsRef<[u8]>> Pixels<B> {
    /// The kind a region of an avatar encoded with `subsampling` is kept in.
    pub fn kind_for(subsampling: Subsampling, data: B) -> Pixels<B> {
        match subsampling {
            Subsampling::S420 => Pixels::Ycc420(data),
            _ => Pixels::Rgb(data),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Pixels::Rgb(b) | Pixels::Ycc420(b) => b.as_ref(),
        }
    }

    /// Other bytes of the same kind.
    pub fn with<T>(&self, data: T) -> Pixels<T> {
        match self {
            Pixels::Rgb(_) => Pixels::Rgb(data),
            Pixels::Ycc420(_) => Pixels::Ycc420(data),
        }
    }

    pub fn view(&self) -> Pixels<&[u8]> {
        self.with(self.bytes())
    }

    /// The `w` x `h` region as packed RGB (converted as a JPEG decode converts, if kept as
    /// planes).
    pub fn rgb(&self, w: u32, h: u32) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        match self {
            Pixels::Rgb(b) => Ok(b.as_ref().into()),
            Pixels::Ycc420(b) => {
                encode::planes_to_rgb(b.as_ref(), w, h, Subsampling::S420).map(Into::into)
            }
        }
    }

    /// Encodes the `w` x `h` region with `params` into `out`.
    pub fn encode_into(
        &self,
        w: u32,
        h: u32,
        params: Params,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        match self {
            Pixels::Rgb(b) => encode::encode_into(Rgb::packed(b.as_ref(), w, h), params, out),
            Pixels::Ycc420(b) => encode::encode_planes_into(b.as_ref(), w, h, params, out),
        }
    }
}

/// Bytes of `region`'s pixels for an avatar encoded with `subsampling`.
pub fn region_bytes(region: &Region, subsampling: Subsampling) -> usize {
    match subsampling {
        Subsampling::S420 => Planes::new(region.w, region.h).bytes(),
        _ => region.w as usize * region.h as usize * 3,
    }
}

impl Frame {
    /// Encodes `rgb`, a whole `grid`-sized frame, and keeps the region around `face`.
    pub fn prepare(
        rgb: &[u8],
        grid: &Grid,
        face: &FaceBox,
        params: Params,
    ) -> Result<Frame, String> {
        let mut jpeg = Vec::new();
        encode::encode_into(Rgb::packed(rgb, grid.width, grid.height), params, &mut jpeg)?;
        // The encoder's buffer has room for the worst case; the frame keeps only its bytes.
        jpeg.shrink_to_fit();
        let layout = segments::parse(&jpeg)?;
        let region = grid.region(face);
        let stride = grid.width as usize * 3;
        let at = region.y as usize * stride + region.x as usize * 3;
        let pixels = Rgb {
            pixels: &rgb[at..],
            width: region.w,
            height: region.h,
            pitch: stride,
        };
        let pixels = match params.subsampling {
            Subsampling::S420 => {
                Pixels::Ycc420(Bytes::from(encode::to_planes(pixels, Subsampling::S420)?))
            }
            _ => {
                let mut packed = Vec::with_capacity(region.w as usize * region.h as usize * 3);
                for row in pixels.pixels.chunks(stride).take(region.h as usize) {
                    packed.extend_from_slice(&row[..region.w as usize * 3]);
                }
                Pixels::Rgb(Bytes::from(packed))
            }
        };
        Ok(Frame::new(Bytes::from(jpeg), layout, region, pixels))
    }

    fn new(jpeg: Bytes, layout: Layout, region: Region, pixels: Pixels<Bytes>) -> Frame {
        Frame {
            jpeg_crc: crc32fast::hash(&jpeg),
            jpeg,
            layout,
            region,
            pixels,
        }
    }

    /// Bytes this frame holds in memory.
    pub fn resident_bytes(&self) -> usize {
        self.jpeg.len() + self.layout.heap_bytes() + self.pixels.bytes().len()
    }
}

/// The encode parameters of an avatar's prepared frames.
pub fn params(width: u32, quality: u8, subsampling: Subsampling) -> Params {
    Params {
        quality,
        subsampling,
        restart_mcus: segments::restart_for(width, subsampling),
    }
}

/// A fingerprint of what the prepared frames are made from: the manifest, the boxes and each
/// frame file's name, size and modification time. FNV-1a, so it is the same in every build.
pub fn fingerprint(dir: &Path, files: &[PathBuf]) -> Result<u64, String> {
    let mut h = Fnv::default();
    for name in [MANIFEST_FILE, BOXES_FILE] {
        let path = dir.join(name);
        h.write(&std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.write(f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        h.write(&meta.len().to_le_bytes());
        h.write(&modified.to_le_bytes());
    }
    Ok(h.0)
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        // Length-delimit fields so that moving bytes between them changes the hash.
        self.0 = (self.0 ^ bytes.len() as u64).wrapping_mul(0x100_0000_01b3);
    }
}

/// What the file must match to be used.
pub struct Expect<'a> {
    pub params: Params,
    pub fingerprint: u64,
    pub grid: &'a Grid,
    pub boxes: &'a [FaceBox],
}

fn subsampling_code(s: Subsampling) -> u8 {
    match s {
        Subsampling::S444 => 0,
        Subsampling::S422 => 1,
        Subsampling::S420 => 2,
        Subsampling::Gray => 3,
    }
}

/// The header of a file holding `expect`'s frames, with `jpeg_lens` and a checksum of 0
/// (see [`seal`]).
fn header(expect: &Expect<'_>, jpeg_lens: impl Iterator<Item = u32>) -> Vec<u8> {
    let p = expect.params;
    let mut out = Vec::with_capacity(FIXED + 4 * expect.boxes.len());
    out.extend_from_slice(MAGIC);
    out.push(p.quality);
    out.push(subsampling_code(p.subsampling));
    out.extend_from_slice(&p.restart_mcus.to_le_bytes());
    out.extend_from_slice(&expect.fingerprint.to_le_bytes());
    for v in [
        expect.grid.width,
        expect.grid.height,
        expect.boxes.len() as u32,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    for len in jpeg_lens {
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

/// The checksum of a file's lengths and frames: CRC-32 (IEEE) of `parts`, in order.
fn checksum<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Writes into a whole prepared file's image the checksum of what follows it (the file as
/// [`write()`] leaves it; tests and the fuzz target seal what they tamper with, to reach the
/// checks behind the checksum).
pub fn seal(file: &mut [u8]) {
    if file.len() >= FIXED {
        let sum = checksum([&file[FIXED..]]);
        file[IDENTITY..FIXED].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Writes `frames` to `dir/prepared.fcp` (through a temporary file and a rename).
pub fn write(dir: &Path, expect: &Expect<'_>, frames: &[Frame]) -> Result<PathBuf, String> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut head = header(expect, frames.iter().map(|f| f.jpeg.len() as u32));
        let sum = checksum(
            std::iter::once(&head[FIXED..])
                .chain(frames.iter().flat_map(|f| [&f.jpeg[..], f.pixels.bytes()])),
        );
        head[IDENTITY..FIXED].copy_from_slice(&sum.to_le_bytes());
        f.write_all(&head)?;
        for frame in frames {
            f.write_all(&frame.jpeg)?;
            f.write_all(frame.pixels.bytes())?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: cannot write: {e}", path.display())
    })?;
    Ok(path)
}

/// The JPEG lengths `dir/prepared.fcp` lists, if it exists and matches `expect`: what
/// [`read`] would load, from the header alone (every length checked against the file's size
/// and the most a frame's JPEG can be). `Ok(None)`: absent.
pub fn jpeg_lengths(dir: &Path, expect: &Expect<'_>) -> Result<Option<Vec<u32>>, String> {
    Ok(open(dir, expect)?.map(|o| o.lens))
}

/// A prepared file whose header matches, positioned after its header.
struct Opened {
    file: std::fs::File,
    /// Each frame's JPEG length, and those lengths as the file stores them.
    lens: Vec<u32>,
    raw_lens: Vec<u8>,
    /// The checksum the header says the lengths and frames have.
    sum: u32,
    /// Bytes of frames after the header.
    total: usize,
}

/// The file, if it exists and its header matches `expect`. Every length is checked before
/// anything is allocated for it: each within the most a frame's JPEG can be, and all of them
/// with the regions' pixels exactly the bytes the file holds after its header.
fn open(dir: &Path, expect: &Expect<'_>) -> Result<Option<Opened>, String> {
    use std::io::Read;
    let path = dir.join(FILE);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let want = header(expect, std::iter::empty());
    let head_len = want.len() + 4 * expect.boxes.len();
    if size < head_len as u64 {
        return Err(format!(
            "{}: the header is cut short ({size} bytes; {head_len} expected)",
            path.display()
        ));
    }
    let mut head = vec![0u8; head_len];
    f.read_exact(&mut head)
        .map_err(|e| format!("{}: header: {e}", path.display()))?;
    check_header(&path, &head[..IDENTITY], &want[..IDENTITY])?;
    let sum = u32::from_le_bytes([
        head[IDENTITY],
        head[IDENTITY + 1],
        head[IDENTITY + 2],
        head[IDENTITY + 3],
    ]);
    let raw_lens = head[want.len()..].to_vec();
    let lens: Vec<u32> = raw_lens
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let grid = expect.grid;
    let most = encode::worst_case_bytes(grid.width, grid.height, expect.params.subsampling);
    let mut total = 0u64;
    for (i, (&len, b)) in lens.iter().zip(expect.boxes).enumerate() {
        if len < 4 || len as usize > most {
            return Err(format!(
                "{}: frame {i}'s JPEG length {len} is impossible for a {}x{} frame (4 to {most} bytes)",
                path.display(),
                grid.width,
                grid.height
            ));
        }
        total += len as u64 + region_bytes(&grid.region(b), expect.params.subsampling) as u64;
    }
    let body = size - head_len as u64;
    if body != total {
        let what = if body < total {
            "cut short"
        } else {
            "longer than its frames"
        };
        return Err(format!(
            "{}: the frames are {what}: the header lists {total} bytes of frames, the file holds {body}",
            path.display()
        ));
    }
    Ok(Some(Opened {
        file: f,
        lens,
        raw_lens,
        sum,
        total: total as usize,
    }))
}

fn check_header(path: &Path, got: &[u8], want: &[u8]) -> Result<(), String> {
    let what = if got[..8] != want[..8] {
        "another format version"
    } else if got[8..12] != want[8..12] {
        "other encode parameters (quality, subsampling or restart interval)"
    } else if got[12..20] != want[12..20] {
        "other sources (the manifest, boxes or frame files changed since)"
    } else if got != want {
        "another frame size or count"
    } else {
        return Ok(());
    };
    Err(format!(
        "{} was prepared with {what}: run `framecast-compositor avatar prepare` again",
        path.display()
    ))
}

/// The headers (every marker before the entropy-coded data) the encoder writes for a frame
/// of `grid`'s size with `params`: quantisation and Huffman tables, frame header with its
/// components and sampling, restart interval, scan header. Splicing relies on every one of
/// them, so each prepared frame's headers must be exactly these.
fn expected_headers(grid: &Grid, params: Params) -> Result<Vec<u8>, String> {
    let blank = vec![0u8; grid.width as usize * grid.height as usize * 3];
    let mut jpeg = Vec::new();
    encode::encode_into(
        Rgb::packed(&blank, grid.width, grid.height),
        params,
        &mut jpeg,
    )?;
    let layout = segments::parse(&jpeg)?;
    Ok(jpeg[..layout.starts[0] as usize].to_vec())
}

/// The frames of `dir/prepared.fcp`, checked against `expect`; `Ok(None)` when there is no
/// such file. Every length is checked against the file before anything is allocated, and
/// every JPEG parsed and its headers compared with the encoder's, so a corrupt or tampered
/// file is refused (the avatar is then prepared from its frames), never half-used.
pub fn read(dir: &Path, expect: &Expect<'_>) -> Result<Option<Vec<Frame>>, String> {
    use std::io::Read;
    let Some(Opened {
        mut file,
        lens,
        raw_lens,
        sum,
        total,
    }) = open(dir, expect)?
    else {
        return Ok(None);
    };
    let path = dir.join(FILE);
    let grid = expect.grid;
    let regions: Vec<Region> = expect.boxes.iter().map(|b| grid.region(b)).collect();
    // One read of exactly the frames (their size checked against the file's): every
    // frame's JPEG and pixels are slices of it, so the avatar holds exactly the frames'
    // bytes and nothing is copied twice.
    let mut data = Vec::new();
    data.try_reserve_exact(total)
        .map_err(|e| format!("{}: {total} bytes of frames: {e}", path.display()))?;
    Read::take(&mut file, total as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if data.len() != total {
        return Err(format!(
            "{}: the file changed while it was read ({} bytes of frames; {total} expected)",
            path.display(),
            data.len()
        ));
    }
    if checksum([&raw_lens[..], &data[..]]) != sum {
        return Err(format!(
            "{}: the frames' checksum does not match the header's: the file was damaged or changed after it was written",
            path.display()
        ));
    }
    let headers =
        expected_headers(grid, expect.params).map_err(|e| format!("{}: {e}", path.display()))?;
    let data = Bytes::from(data);
    let mut at = 0;
    let mut frames = Vec::with_capacity(lens.len());
    for (i, (&len, region)) in lens.iter().zip(regions).enumerate() {
        let jpeg_end = at + len as usize;
        let end = jpeg_end + region_bytes(&region, expect.params.subsampling);
        let jpeg = data.slice(at..jpeg_end);
        let bad = |e: String| format!("{}: frame {i}: {e}", path.display());
        let layout = segments::parse(&jpeg).map_err(bad)?;
        if layout.size != (grid.width, grid.height) {
            return Err(bad(format!(
                "{}x{}; the avatar is {}x{}",
                layout.size.0, layout.size.1, grid.width, grid.height
            )));
        }
        if layout.starts.len() != grid.segments() {
            return Err(bad(format!(
                "{} restart segments; its size needs {}",
                layout.starts.len(),
                grid.segments()
            )));
        }
        if jpeg[..layout.starts[0] as usize] != headers[..] {
            return Err(bad(
                "its JPEG headers (tables, components, sampling or restart interval) differ from those the encoder writes for the avatar's parameters".into(),
            ));
        }
        frames.push(Frame::new(
            jpeg,
            layout,
            region,
            Pixels::kind_for(expect.params.subsampling, data.slice(jpeg_end..end)),
        ));
        at = end;
    }
    Ok(Some(frames))
}

#[cfg(test)]
mod tests {
    use crate::avatar::{Avatar, Source};
    use crate::demo::{self, DemoOptions};
    use crate::encode::Subsampling;

    fn unused(a: &Avatar) -> String {
        match &a.source {
            Source::Prepared {
                unused_file: Some(why),
            } => why.clone(),
            other => panic!("the prepared file was used: {other:?}"),
        }
    }

    /// The prepared file is used only while it matches the bundle and the settings; any
    /// mismatch or damage falls back to preparing at load, saying why, with the same frames.
    #[test]
    fn a_prepared_file_is_used_only_while_it_matches() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = DemoOptions {
            id: "a".into(),
            width: 100,
            height: 70,
            frames: 3,
            crop_size: 32,
            ..Default::default()
        };
        let dir = demo::write_demo(tmp.path(), &opts).unwrap();
        let fresh = Avatar::load(&dir).unwrap();
        assert_eq!(fresh.source, Source::Prepared { unused_file: None });
        let (prepared, path) = Avatar::prepare(&dir, Subsampling::S420).unwrap();
        let read = Avatar::load(&dir).unwrap();
        assert_eq!(read.source, Source::PreparedFile);
        assert_eq!(read.resident_bytes(), prepared.resident_bytes());
        assert_eq!(
            Avatar::footprint(&dir, Subsampling::S420).unwrap(),
            read.resident_bytes()
        );
        for (a, b) in read.frames.iter().zip(&fresh.frames) {
            assert!(a.jpeg == b.jpeg && a.pixels == b.pixels && a.region == b.region);
        }
        // Other settings.
        let other = Avatar::load_with(&dir, Subsampling::S444).unwrap();
        assert!(unused(&other).contains("other encode parameters"));
        // Damage: cut short, then a byte of a JPEG's markers changed (and the file sealed
        // again, as a deliberate change would be).
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(unused(&Avatar::load(&dir).unwrap()).contains("cut short"));
        let mut bad = bytes.clone();
        let first_jpeg = super::FIXED + 4 * 3;
        bad[first_jpeg + 1] = 0x00;
        super::seal(&mut bad);
        std::fs::write(&path, &bad).unwrap();
        assert!(unused(&Avatar::load(&dir).unwrap()).contains("frame 0"));
        // Sources changed since.
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Avatar::load(&dir).unwrap().source, Source::PreparedFile);
        let boxes = dir.join(crate::manifest::BOXES_FILE);
        let text = std::fs::read_to_string(&boxes).unwrap();
        std::fs::write(&boxes, format!("{text} ")).unwrap();
        assert!(unused(&Avatar::load(&dir).unwrap()).contains("other sources"));
    }

    /// A tampered file is a problem reported, never an abort or a corrupt frame: lengths
    /// that sum past the file (85 GB of 0xFFFFFFFF), and JPEG headers damaged where the
    /// splice relies on them (a Huffman table's counts, the component count, the sampling),
    /// each fall back to preparing the frames, saying why.
    #[test]
    fn tampered_lengths_and_headers_are_refused_before_use() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = DemoOptions {
            id: "t".into(),
            width: 96,
            height: 64,
            frames: 3,
            crop_size: 32,
            ..Default::default()
        };
        let dir = demo::write_demo(tmp.path(), &opts).unwrap();
        let (_, path) = Avatar::prepare(&dir, Subsampling::S420).unwrap();
        let good = std::fs::read(&path).unwrap();
        let lens = super::FIXED;
        let first_jpeg = lens + 4 * 3;
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bad = good.clone();
            edit(&mut bad);
            std::fs::write(&path, &bad).unwrap();
            let why = unused(&Avatar::load(&dir).unwrap());
            let footprint = Avatar::footprint(&dir, Subsampling::S420).unwrap();
            assert!(
                footprint < 1 << 20,
                "footprint {footprint} from a tampered header"
            );
            why
        };
        let why = with(&|b| b[lens..first_jpeg].fill(0xFF));
        assert!(why.contains("impossible"), "{why}");
        // One length larger, the next smaller by as much: the sum still matches the file.
        let why = with(&|b| {
            let l0 = u32::from_le_bytes(b[lens..lens + 4].try_into().unwrap());
            let l1 = u32::from_le_bytes(b[lens + 4..lens + 8].try_into().unwrap());
            b[lens..lens + 4].copy_from_slice(&(l0 + 7).to_le_bytes());
            b[lens + 4..lens + 8].copy_from_slice(&(l1 - 7).to_le_bytes());
        });
        assert!(why.contains("checksum"), "{why}");
        // Damage in the entropy-coded data, which only a decode would see: the checksum.
        let why = with(&|b| {
            let at = b.len() - 200;
            b[at] ^= 0x55;
        });
        assert!(why.contains("checksum"), "{why}");
        let marker = |b: &[u8], m: u8| {
            (first_jpeg..b.len() - 1)
                .find(|&i| b[i] == 0xFF && b[i + 1] == m)
                .unwrap()
        };
        // Tampered on purpose (the checksum made again): the headers the splice relies on
        // are checked each. DHT: marker, length (2), class and id (1), then 16 code counts.
        let why = with(&|b| {
            let at = marker(b, 0xC4) + 5;
            b[at] = b[at].wrapping_add(1);
            super::seal(b);
        });
        assert!(why.contains("frame 0"), "{why}");
        // SOF0: marker, length (2), precision (1), height (2), width (2), components (1),
        // then per component its id and sampling factors.
        let why = with(&|b| {
            let at = marker(b, 0xC0) + 9;
            b[at] = 1;
            super::seal(b);
        });
        assert!(why.contains("frame 0"), "{why}");
        let why = with(&|b| {
            let at = marker(b, 0xC0) + 11;
            b[at] = 0x11;
            super::seal(b);
        });
        assert!(why.contains("headers"), "{why}");
        std::fs::write(&path, &good).unwrap();
        assert_eq!(Avatar::load(&dir).unwrap().source, Source::PreparedFile);
    }
}
