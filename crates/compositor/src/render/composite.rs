//! One frame: a generated face crop pasted into its background in place, the frame encoded,
//! the background restored.

use crate::avatar::Avatar;
use crate::blend::{self, BlendScratch};
use crate::encode::{self, Subsampling};
use std::cell::RefCell;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

thread_local! {
    /// Per rayon thread: blend buffers and the background pixels a paste covers, reused frame
    /// after frame so the hot path allocates nothing.
    static SCRATCH: RefCell<(BlendScratch, Vec<u8>)> = RefCell::new((BlendScratch::default(), Vec::new()));
}

/// A background frame with a face pasted into it, locked; dropping it (also when unwinding)
/// puts the saved pixels back and unlocks.
struct Pasted<'a> {
    pixels: MutexGuard<'a, Vec<u8>>,
    saved: &'a mut Vec<u8>,
    avatar: &'a Avatar,
    background: usize,
}

impl<'a> Pasted<'a> {
    /// Locks `avatar`'s frame `background` and saves the pixels a paste may write.
    fn save(avatar: &'a Avatar, background: usize, saved: &'a mut Vec<u8>) -> Pasted<'a> {
        let pixels = avatar.frames[background].lock();
        saved.clear();
        for r in Self::rows(avatar, background) {
            saved.extend_from_slice(&pixels[r]);
        }
        Pasted {
            pixels,
            saved,
            avatar,
            background,
        }
    }

    fn rows(avatar: &Avatar, background: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        blend::pasted_rows(
            avatar.manifest.width,
            &avatar.boxes[background],
            &avatar.box_masks[background],
        )
    }
}

impl Drop for Pasted<'_> {
    fn drop(&mut self) {
        let mut from = 0;
        for r in Self::rows(self.avatar, self.background) {
            let n = r.len();
            self.pixels[r].copy_from_slice(&self.saved[from..from + n]);
            from += n;
        }
    }
}

/// Blends and encodes one frame on the calling (rayon) thread; returns the JPEG and the
/// blend and encode times. The face is pasted into the background in place, encoded, and
/// the background restored (see [`crate::avatar::Background`]).
pub fn compose(
    avatar: &Avatar,
    background: usize,
    crop_chw: &[u8],
    quality: u8,
    subsampling: Subsampling,
) -> Result<(Vec<u8>, Duration, Duration), String> {
    let m = &avatar.manifest;
    SCRATCH.with(|cell| {
        let (scratch, saved) = &mut *cell.borrow_mut();
        let t0 = Instant::now();
        let mut frame = Pasted::save(avatar, background, saved);
        blend::paste(
            &mut frame.pixels,
            m.width,
            &avatar.boxes[background],
            crop_chw,
            m.crop_size,
            &avatar.box_masks[background],
            scratch,
        )?;
        let t1 = Instant::now();
        let jpeg = encode::encode_rgb(&frame.pixels, m.width, m.height, quality, subsampling)?;
        let t2 = Instant::now();
        drop(frame);
        Ok((jpeg, (t1 - t0) + t2.elapsed(), t2 - t1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{self, DemoOptions};
    use rayon::prelude::*;

    fn avatar(root: &std::path::Path) -> Avatar {
        let opts = DemoOptions {
            id: "a".into(),
            width: 96,
            height: 64,
            frames: 3,
            crop_size: 32,
            ..Default::default()
        };
        Avatar::load(&demo::write_demo(root, &opts).unwrap()).unwrap()
    }

    /// What `compose` must produce: the crop pasted into a copy of the background, encoded.
    fn expected(a: &Avatar, bg: usize, crop: &[u8]) -> Vec<u8> {
        let m = &a.manifest;
        let mut frame = a.frames[bg].to_vec();
        let mut scratch = BlendScratch::default();
        let (b, mask) = (&a.boxes[bg], &a.box_masks[bg]);
        blend::paste(
            &mut frame,
            m.width,
            b,
            crop,
            m.crop_size,
            mask,
            &mut scratch,
        )
        .unwrap();
        assert_ne!(frame, a.frames[bg].to_vec(), "the paste changed nothing");
        encode::encode_rgb(&frame, m.width, m.height, 90, Subsampling::S444).unwrap()
    }

    #[test]
    fn compose_pastes_in_place_then_restores_the_background() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let before = a.frames[1].to_vec();
        let crop = vec![250u8; 3 * 32 * 32];
        let (jpeg, _, _) = compose(&a, 1, &crop, 90, Subsampling::S444).unwrap();
        assert_eq!(jpeg, expected(&a, 1, &crop));
        assert!(a.frames[1].to_vec() == before, "background not restored");
    }

    /// Many workers compositing different faces into the same background at once each get
    /// their own face: the lock keeps one paste from showing in another's frame.
    #[test]
    fn concurrent_composes_of_one_background_do_not_mix() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crops = [vec![250u8; 3 * 32 * 32], vec![5u8; 3 * 32 * 32]];
        let want = [expected(&a, 2, &crops[0]), expected(&a, 2, &crops[1])];
        let before = a.frames[2].to_vec();
        (0..64usize).into_par_iter().for_each(|i| {
            let (jpeg, _, _) = compose(&a, 2, &crops[i % 2], 90, Subsampling::S444).unwrap();
            assert!(jpeg == want[i % 2], "compose {i} saw another worker's face");
        });
        assert!(a.frames[2].to_vec() == before, "background not restored");
    }
}
