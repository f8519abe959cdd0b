//! Entry points for the compositor's fuzz targets in `fuzz/` (`avatar_manifest`,
//! `prepared_file`) and for the regression test that replays what they found
//! (`tests/fuzz_regressions.rs`): arbitrary bytes must be refused with problems that name
//! their field, never a panic or an abort, and what is accepted must be usable.

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

/// The avatar `prepared_file` loads: 96x64, three frames, prepared at 4:2:0. Made once per
/// process, in its own directory; the prefix of its prepared file that ties the file to it
/// (format, parameters, fingerprint, size, count) and the rest of that file.
struct PreparedFixture {
    root: std::path::PathBuf,
    dir: std::path::PathBuf,
    prefix: Vec<u8>,
    tail: Vec<u8>,
}

fn prepared_fixture() -> &'static PreparedFixture {
    static FIXTURE: std::sync::OnceLock<PreparedFixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root =
            std::env::temp_dir().join(format!("framecast-fuzz-prepared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let opts = crate::demo::DemoOptions {
            id: "fuzz".into(),
            width: 96,
            height: 64,
            frames: 3,
            crop_size: 32,
            ..Default::default()
        };
        let dir = crate::demo::write_demo(&root, &opts).expect("writing the fuzz avatar");
        let (_, path) = crate::avatar::Avatar::prepare(&dir, crate::encode::Subsampling::S420)
            .expect("preparing the fuzz avatar");
        let file = std::fs::read(&path).expect("reading the prepared file");
        let prefix = file[..crate::prepared::FIXED].to_vec();
        let tail = file[crate::prepared::FIXED..].to_vec();
        PreparedFixture {
            root,
            dir,
            prefix,
            tail,
        }
    })
}

/// Removes the fixture's directory (a static is never dropped, so each process would leave
/// one in the temporary directory). Only for the end of a process's use: `prepared_file`
/// fails after it.
pub fn remove_prepared_fixture() {
    let _ = std::fs::remove_dir_all(&prepared_fixture().root);
}

/// The part of the fixture's prepared file after its header's identity and checksum (the
/// JPEG lengths and the frames): the seed `prepared_file` mutates.
pub fn prepared_seed() -> Vec<u8> {
    prepared_fixture().tail.clone()
}

/// A prepared file whose identity is right, whose lengths and frames are `data`, and whose
/// checksum matches them (so the fuzzer reaches the checks behind it): loading its avatar
/// never panics or aborts and always yields an avatar (from the file, or prepared again from
/// the frames); frames taken from the file may fail to decode (a file made to pass every
/// check but the decode, as someone who can write the avatar root could make), but as an
/// error, never a panic, and a face splices into each without one.
pub fn prepared_file(data: &[u8]) {
    use crate::avatar::{Avatar, Source};
    use crate::render::{compose, idle, Crop, Output};
    let fx = prepared_fixture();
    let mut file = [fx.prefix.as_slice(), data].concat();
    crate::prepared::seal(&mut file);
    std::fs::write(fx.dir.join(crate::prepared::FILE), &file).expect("writing the prepared file");
    let avatar = Avatar::load(&fx.dir).expect("the bundle itself is sound");
    if avatar.source != Source::PreparedFile {
        return;
    }
    let s = avatar.manifest.crop_size as usize;
    let face = vec![128u8; framecast_proto::i420::len(1, s, s)];
    let jpeg = Output::Jpeg {
        quality: avatar.params.quality,
        subsampling: avatar.params.subsampling,
    };
    for bg in 0..avatar.frames.len() {
        if let Ok(raw) = idle(&avatar, bg, Output::I420, None) {
            assert!(!raw.image.is_empty());
        }
        let spliced = compose(&avatar, bg, Crop::I420(&face), jpeg, None).expect("a face splices");
        assert!(!spliced.image.is_empty());
    }
}
