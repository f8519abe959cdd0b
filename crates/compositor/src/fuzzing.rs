//! Entry point for the `avatar_manifest` fuzz target in `fuzz/` and for the regression test
//! that replays what it found (`tests/fuzz_regressions.rs`): arbitrary bytes must be refused
//! with problems that name their field, never a panic, and what is accepted must be usable.

use crate::manifest::Manifest;

/// Manifest text: an accepted manifest has no problems, a safe id, and a mask that can be
/// built at its crop size.
pub fn avatar_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Manifest::parse(text) {
        Ok(m) => {
            assert!(m.problems().is_empty());
            assert!(crate::check_name(&m.id).is_ok(), "id {:?}", m.id);
            let mask = crate::mask::lower_face(m.crop_size, m.mask.feather);
            assert_eq!(mask.len(), (m.crop_size as usize).pow(2));
        }
        Err(problems) => {
            assert!(!problems.is_empty());
            assert!(problems.iter().all(|p| !p.is_empty()));
        }
    }
}
