//! The background JPEGs of the avatars sessions are talking over.
//!
//! A spliced session's talking frames come as their face region only, and each background's
//! prepared JPEG comes once per Render stream (`RenderRequest.backgrounds_once`); later frames
//! name it by CRC. The shared stream needs the picture whenever it encodes a frame for that
//! background (a key frame where a session joins, a frame it has not made yet), and a frame
//! that cannot be spliced needs it whole, so the JPEGs are kept here: one per background of
//! each avatar that has a session open (at most what the compositor holds for it), dropped
//! with the avatar's last session.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Every avatar's kept backgrounds, by avatar.
#[derive(Default)]
pub struct Backgrounds {
    avatars: Mutex<HashMap<String, Weak<AvatarBackgrounds>>>,
}

/// One avatar's background JPEGs, by background index, each with its CRC-32.
pub struct AvatarBackgrounds {
    /// Backgrounds the avatar has (its `AvatarInfo.frame_count`): no more are kept.
    frames: u32,
    jpegs: Mutex<HashMap<u32, (u32, Bytes)>>,
}

impl Backgrounds {
    /// The store of `avatar` (`frames` backgrounds), shared with its other sessions; kept
    /// while a session holds it.
    pub fn of(&self, avatar: &str, frames: u32) -> Arc<AvatarBackgrounds> {
        let mut avatars = self.avatars.lock();
        avatars.retain(|_, w| w.strong_count() > 0);
        if let Some(held) = avatars.get(avatar).and_then(Weak::upgrade) {
            if held.frames >= frames {
                return held;
            }
        }
        // New, or the avatar grew (replaced under its name): its sessions start a new store.
        let made = Arc::new(AvatarBackgrounds {
            frames,
            jpegs: Mutex::default(),
        });
        avatars.insert(avatar.to_string(), Arc::downgrade(&made));
        made
    }
}

impl AvatarBackgrounds {
    /// Keeps `jpeg` (CRC-32 `crc`) as background `background`, replacing another picture
    /// there (a replaced avatar). Ignored past the avatar's frame count.
    pub fn keep(&self, background: u32, crc: u32, jpeg: Bytes) {
        if background < self.frames {
            self.jpegs.lock().insert(background, (crc, jpeg));
        }
    }

    /// Background `background`'s JPEG, if the one kept has CRC `crc`.
    pub fn get(&self, background: u32, crc: u32) -> Option<Bytes> {
        let jpegs = self.jpegs.lock();
        let (kept, jpeg) = jpegs.get(&background)?;
        (*kept == crc).then(|| jpeg.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_of_an_avatar_share_its_backgrounds_and_the_last_one_drops_them() {
        let all = Backgrounds::default();
        let a = all.of("a", 3);
        a.keep(1, 7, Bytes::from_static(b"one"));
        a.keep(3, 9, Bytes::from_static(b"past the frames"));
        let b = all.of("a", 3);
        assert_eq!(b.get(1, 7).as_deref(), Some(&b"one"[..]));
        assert_eq!(b.get(1, 8), None, "another picture at that background");
        assert_eq!(b.get(3, 9), None);
        assert!(all.of("other", 3).get(1, 7).is_none());
        drop((a, b));
        assert!(
            all.of("a", 3).get(1, 7).is_none(),
            "dropped with its sessions"
        );
    }
}
