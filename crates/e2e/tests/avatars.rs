//! Avatars on disk and in memory: `avatar check`, eviction under a RAM budget, leases that
//! keep an avatar in use, and avatars that fail to load.

use framecast_compositor::avatar::Avatar;
use framecast_compositor::avatar_store::AvatarStore;
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::encode::Subsampling;
use framecast_compositor::manifest::{self, Manifest};
use framecast_e2e::request;
use framecast_e2e::stack::{render, stack, stack_with_budget};
use tonic::Code;

#[tokio::test]
async fn avatar_check_names_the_file_and_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        id: "x".into(),
        width: 96,
        height: 64,
        frames: 3,
        crop_size: 32,
        ..Default::default()
    };
    let dir = demo::write_demo(tmp.path(), &opts).unwrap();
    assert!(Avatar::load(&dir).is_ok());
    std::fs::write(dir.join("frames/000001.jpg"), b"garbage").unwrap();
    std::fs::write(
        dir.join("boxes.json"),
        "[[0,0,10,10],[90,0,10,10],[0,0,10,10]]",
    )
    .unwrap();
    let problems = Avatar::load(&dir).err().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("boxes.json") && p.contains("box 1")),
        "{problems:?}"
    );
    std::fs::write(
        dir.join("boxes.json"),
        "[[0,0,10,10],[0,0,10,10],[0,0,10,10]]",
    )
    .unwrap();
    let problems = Avatar::load(&dir).err().unwrap();
    assert!(
        problems.iter().any(|p| p.contains("000001.jpg")),
        "{problems:?}"
    );
}

/// The compositor's ListAvatars answer.
async fn list_avatars(
    s: &framecast_e2e::stack::Stack,
) -> framecast_proto::compositor::v1::ListAvatarsResponse {
    s.client
        .clone()
        .list_avatars(framecast_proto::compositor::v1::ListAvatarsRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn avatars_are_evicted_under_a_small_budget() {
    let tmp = tempfile::tempdir().unwrap();
    // Written by the first stack, prepared so their footprints are exact; sized here so
    // exactly one avatar fits.
    let probe = stack(tmp.path(), 4).await;
    drop(probe);
    let dir = |id: &str| tmp.path().join("avatars").join(id);
    for id in ["small", "tall"] {
        Avatar::prepare(&dir(id), Subsampling::S420).unwrap();
    }
    let fp = |id: &str| Avatar::footprint(&dir(id), Subsampling::S420).unwrap();
    let budget = fp("small").max(fp("tall")) + 1;
    assert!(budget < fp("small") + fp("tall"));
    let s = stack_with_budget(tmp.path(), 4, Some(budget)).await;
    // The stack wrote the bundles again (the same frames): prepare them again before their
    // first (on-demand) load.
    for id in ["small", "tall"] {
        Avatar::prepare(&dir(id), Subsampling::S420).unwrap();
    }
    render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap();
    render(&s.client, vec![request("tall", 0, 2)])
        .await
        .unwrap();
    render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap();
    assert_eq!(s.metrics.avatar_evictions.get(), 2);
    let list = list_avatars(&s).await;
    let state = |id: &str| {
        list.avatars
            .iter()
            .find(|a| a.avatar_id == id)
            .unwrap()
            .state
            .clone()
    };
    assert_eq!(state("small"), "ready");
    assert_eq!(state("tall"), "available");
    assert!(s.metrics.avatar_bytes.get() as u64 <= budget);
    // Every avatar described, the one on disk from its bundle as the loaded one from memory.
    for id in ["small", "tall"] {
        let a = list.avatars.iter().find(|a| a.avatar_id == id).unwrap();
        let m = Manifest::load(&dir(id)).unwrap();
        let frames = manifest::frame_files(&dir(id)).unwrap().len() as u32;
        assert_eq!(
            (a.width, a.height, a.fps, a.frame_count, &a.model, a.speaks),
            (
                m.width,
                m.height,
                m.fps,
                frames,
                &m.model,
                Some(m.audio.is_some())
            ),
            "{id}"
        );
        assert!(frames > 0 && a.width > 0 && !a.model.is_empty());
        assert_eq!(a.resident_bytes > 0, id == "small");
    }
    // A bundle that cannot load says why before anyone asks for it.
    std::fs::create_dir_all(dir("broken").join("frames")).unwrap();
    std::fs::write(
        dir("broken").join("avatar.toml"),
        "id = \"broken\"\nfps = 0\n",
    )
    .unwrap();
    let list = list_avatars(&s).await;
    let broken = list
        .avatars
        .iter()
        .find(|a| a.avatar_id == "broken")
        .unwrap();
    assert_eq!(broken.state, "failed");
    assert!(broken.reason.contains("avatar.toml"), "{}", broken.reason);
}

#[tokio::test]
async fn an_avatar_in_use_is_not_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    for (id, w) in [("a", 96), ("b", 112)] {
        let opts = DemoOptions {
            id: id.into(),
            width: w,
            height: 64,
            frames: 2,
            crop_size: 32,
            ..Default::default()
        };
        demo::write_demo(tmp.path(), &opts).unwrap();
    }
    let fp = |id: &str| Avatar::footprint(&tmp.path().join(id), Subsampling::S420).unwrap();
    // Unprepared, the footprint is an estimate (the source files' sizes for the JPEGs: here
    // quality 92 at 4:4:4, larger than the prepared encodes); prepared, exact.
    let bound = fp("a");
    let (prepared, _) = Avatar::prepare(&tmp.path().join("a"), Subsampling::S420).unwrap();
    assert!(prepared.resident_bytes() < bound);
    Avatar::prepare(&tmp.path().join("b"), Subsampling::S420).unwrap();
    let store = AvatarStore::new(tmp.path(), true, Some(fp("b") + 1), Default::default()).unwrap();
    let held = store.get("a").await.unwrap();
    assert_eq!(held.resident_bytes(), fp("a"), "footprint must be exact");
    let e = store.get("b").await.err().unwrap();
    assert!(
        matches!(
            e,
            framecast_compositor::avatar_store::AvatarError::NoRoom { .. }
        ),
        "{e}"
    );
    drop(held);
    store.get("b").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_avatar_that_fails_to_load_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 4).await;
    std::fs::write(
        tmp.path().join("avatars/tall/frames/000002.jpg"),
        b"not a jpeg",
    )
    .unwrap();
    let e = render(&s.client, vec![request("tall", 0, 2)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("000002.jpg"), "{}", e.message());
    // The other avatar is unaffected.
    render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap();
}

/// A tampered prepared file (every JPEG length 0xFFFFFFFF: 85 GB with its header and
/// fingerprint intact) never aborts the compositor: LoadAvatar and a Render that loads on
/// demand prepare the avatar from its frames instead, and the frames come.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_prepared_file_is_prepared_again_not_an_abort() {
    use framecast_proto::compositor::v1::LoadAvatarRequest;
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 4).await;
    for id in ["small", "tall"] {
        let dir = tmp.path().join("avatars").join(id);
        let (_, path) = Avatar::prepare(&dir, Subsampling::S420).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let lens = framecast_compositor::prepared::FIXED;
        bytes[lens..lens + 4 * framecast_e2e::FRAMES as usize].fill(0xFF);
        std::fs::write(&path, &bytes).unwrap();
    }
    let loaded = s
        .client
        .clone()
        .load_avatar(LoadAvatarRequest {
            avatar_id: "small".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(loaded.avatar.unwrap().state, "ready");
    let frames = render(&s.client, vec![request("tall", 0, 4)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 4);
}

/// UnloadAvatar names what is wrong: an avatar that does not exist is NOT_FOUND, one that
/// exists but is not in memory FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_an_unknown_avatar_is_not_found() {
    use framecast_proto::compositor::v1::UnloadAvatarRequest;
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 4).await;
    let unload = |id: &str| {
        let mut c = s.client.clone();
        let req = UnloadAvatarRequest {
            avatar_id: id.into(),
        };
        async move { c.unload_avatar(req).await }
    };
    assert_eq!(unload("nobody").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        unload("small").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap();
    unload("small").await.unwrap();
}
