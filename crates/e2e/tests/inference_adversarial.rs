//! The inference server against a hostile client on the same host: planted links in
//! /dev/shm, objects shrunk under load, other clients' regions, floods of registrations,
//! oversized names and messages, and protocol corner cases (issue 13).

use bytes::Bytes;
use framecast_e2e::{kserve_client, spawn_inference};
use framecast_inference::server::{Running, ServeOptions};
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use framecast_proto::kserve::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use framecast_proto::kserve::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    ModelStatisticsRequest, RepositoryModelUnloadRequest, SystemSharedMemoryRegisterRequest,
    SystemSharedMemoryStatusRequest, SystemSharedMemoryUnregisterRequest,
};
use framecast_proto::shm::{key_path, tensor_params, OwnedObject};
use framecast_proto::tensor::DataType;
use std::path::Path;
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::Code;

const CROP: i64 = 16;
type Client = GrpcInferenceServiceClient<Channel>;

async fn start(root: &Path, opts: ServeOptions) -> (Running, Client) {
    let zoo_opts = ZooOptions {
        crop: CROP,
        max_batch_size: 8,
        max_queue_delay_us: 500,
    };
    zoo::write(root, Builtin::Passthrough, &zoo_opts).unwrap();
    let running = spawn_inference(root, opts).await;
    let client = kserve_client(running.url()).await;
    (running, client)
}

fn face_len(batch: usize) -> usize {
    batch * 6 * (CROP * CROP) as usize
}

fn audio_len(batch: usize) -> usize {
    batch * 32 * 16 * 16 * 4
}

fn inputs(batch: usize) -> Vec<InferInputTensor> {
    let b = batch as i64;
    vec![
        InferInputTensor::new("face", DataType::U8, vec![b, 6, CROP, CROP]),
        InferInputTensor::new("audio", DataType::F32, vec![b, 32, 16, 16]),
    ]
}

fn plain(batch: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "passthrough".into(),
        inputs: inputs(batch),
        raw_input_contents: vec![
            Bytes::from(vec![5u8; face_len(batch)]),
            Bytes::from(vec![0u8; audio_len(batch)]),
        ],
        ..Default::default()
    }
}

/// One element whose face and audio come from region `region`.
fn from_region(region: &str) -> ModelInferRequest {
    let mut inputs = inputs(1);
    inputs[0].parameters = tensor_params(region, face_len(1), 0);
    inputs[1].parameters = tensor_params(region, audio_len(1), face_len(1));
    ModelInferRequest {
        model_name: "passthrough".into(),
        inputs,
        ..Default::default()
    }
}

fn register(name: &str, key: &str, byte_size: u64) -> SystemSharedMemoryRegisterRequest {
    SystemSharedMemoryRegisterRequest {
        name: name.into(),
        key: key.into(),
        offset: 0,
        byte_size,
    }
}

fn unique_key(tag: &str) -> String {
    format!("/framecast_adv_{tag}_{}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_planted_in_dev_shm_is_refused_and_its_target_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(tmp.path(), ServeOptions::default()).await;
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, vec![b's'; 8192]).unwrap();
    let key = unique_key("link");
    let link = key_path(&key).unwrap();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let e = client
        .system_shared_memory_register(register("stolen", &key, 8192))
        .await
        .unwrap_err();
    std::fs::remove_file(&link).unwrap();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("key:") && e.message().contains("symbolic link"),
        "{}",
        e.message()
    );
    assert_eq!(std::fs::read(&secret).unwrap(), vec![b's'; 8192]);
    let status = client
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(status.regions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shrinking_an_object_under_load_fails_its_requests_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(tmp.path(), ServeOptions::default()).await;
    let key = unique_key("shrink");
    let size = (face_len(1) + audio_len(1)) as u64;
    let object = OwnedObject::create(&key, size).unwrap();
    object.mapping().write(0, &vec![3u8; face_len(1)]).unwrap();
    client
        .system_shared_memory_register(register("victim", &key, size))
        .await
        .unwrap();
    // Requests from the region, four at a time, while the object is cut to one byte.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (mut c, stop) = (client.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.model_infer(from_region("victim")).await {
                    Ok(_) => codes.push(Code::Ok),
                    Err(e) => {
                        assert!(
                            e.message().contains("victim"),
                            "a failure must name the region: {e:?}"
                        );
                        codes.push(e.code());
                    }
                }
            }
            codes
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(key_path(&key).unwrap())
        .unwrap()
        .set_len(1)
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes = Vec::new();
    for t in load {
        codes.extend(t.await.unwrap());
    }
    assert!(
        codes.contains(&Code::Ok),
        "no request ran before the shrink"
    );
    for c in &codes {
        assert!(
            matches!(c, Code::Ok | Code::InvalidArgument | Code::NotFound),
            "unexpected status {c:?}"
        );
    }
    assert!(
        codes.iter().any(|c| *c != Code::Ok),
        "no request noticed the shrink"
    );
    // The region is gone (unregistered when found shrunk), and the server still serves.
    let e = client.model_infer(from_region("victim")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    client.model_infer(plain(2)).await.unwrap();
    drop(object);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_tokens_each_client_sees_and_uses_only_its_own_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions {
        auth_token: Some("alice-token,bob-token".into()),
        ..Default::default()
    };
    let (server, _) = start(tmp.path(), opts).await;
    let as_client = |token: &'static str| {
        let url = server.url();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let add = framecast_proto::auth::AddToken::new(Some(token)).unwrap();
            GrpcInferenceServiceClient::with_interceptor(channel, add)
        }
    };
    let mut alice = as_client("alice-token").await;
    let mut bob = as_client("bob-token").await;
    let key = unique_key("owners");
    let size = (face_len(1) + audio_len(1)) as u64;
    let object = OwnedObject::create(&key, size).unwrap();
    alice
        .system_shared_memory_register(register("batch", &key, size))
        .await
        .unwrap();

    // Bob can neither list, use, nor remove Alice's region.
    let listed = bob
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.regions.is_empty(), "{:?}", listed.regions.keys());
    let e = bob
        .system_shared_memory_status(SystemSharedMemoryStatusRequest {
            name: "batch".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = bob.model_infer(from_region("batch")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    bob.system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest::default())
        .await
        .unwrap();
    // Bob's own region of the same name is his.
    bob.system_shared_memory_register(register("batch", &key, size))
        .await
        .unwrap();
    bob.system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest::default())
        .await
        .unwrap();

    // Alice's region survived all of it.
    alice.model_infer(from_region("batch")).await.unwrap();
    let listed = alice
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.regions.len(), 1);
    drop(object);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_past_max_shm_regions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions {
        max_shm_regions: 3,
        ..Default::default()
    };
    let (_server, mut client) = start(tmp.path(), opts).await;
    let key = unique_key("flood");
    let object = OwnedObject::create(&key, 4096).unwrap();
    for i in 0..3 {
        client
            .system_shared_memory_register(register(&format!("r{i}"), &key, 4096))
            .await
            .unwrap();
    }
    let e = client
        .system_shared_memory_register(register("r3", &key, 4096))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-shm-regions 3"),
        "{}",
        e.message()
    );
    client
        .system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest { name: "r0".into() })
        .await
        .unwrap();
    client
        .system_shared_memory_register(register("r3", &key, 4096))
        .await
        .unwrap();
    drop(object);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_never_echo_a_client_string_unbounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(tmp.path(), ServeOptions::default()).await;
    let huge = "n".repeat(100_000);
    let small = |e: tonic::Status, code: Code| {
        assert_eq!(
            e.code(),
            code,
            "{}",
            &e.message()[..e.message().len().min(300)]
        );
        assert!(e.message().len() < 1024, "{} bytes", e.message().len());
        assert!(e.message().contains("100000 bytes"), "{}", e.message());
    };
    let mut r = plain(1);
    r.model_name = huge.clone();
    small(
        client.model_infer(r).await.unwrap_err(),
        Code::InvalidArgument,
    );
    let mut r = plain(1);
    r.inputs[0].name = huge.clone();
    small(
        client.model_infer(r).await.unwrap_err(),
        Code::InvalidArgument,
    );
    let mut r = plain(1);
    r.outputs = vec![InferRequestedOutputTensor {
        name: huge.clone(),
        ..Default::default()
    }];
    small(
        client.model_infer(r).await.unwrap_err(),
        Code::InvalidArgument,
    );
    small(
        client.model_infer(from_region(&huge)).await.unwrap_err(),
        Code::NotFound,
    );
    let e = client
        .model_ready(ModelReadyRequest {
            name: huge.clone(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    small(e, Code::InvalidArgument);
    let e = client
        .system_shared_memory_register(register("r", &format!("/{huge}"), 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_is_held_strictly_as_triton_holds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions {
        max_message_bytes: 256 << 10,
        ..Default::default()
    };
    let (_server, mut client) = start(tmp.path(), opts).await;

    // Typed contents and raw_input_contents together.
    let mut r = plain(1);
    r.inputs[1].contents = Some(InferTensorContents {
        fp32_contents: vec![0.0; 32 * 16 * 16],
        ..Default::default()
    });
    let e = client.model_infer(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("inputs[1] 'audio'") && e.message().contains("raw_input_contents"),
        "{}",
        e.message()
    );

    // The same output twice.
    let mut r = plain(1);
    let out = InferRequestedOutputTensor {
        name: "output".into(),
        ..Default::default()
    };
    r.outputs = vec![out.clone(), out];
    let e = client.model_infer(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("outputs[1] 'output'") && e.message().contains("twice"),
        "{}",
        e.message()
    );

    // A version this server does not serve, wherever a request names one.
    let mut r = plain(1);
    r.model_version = "2".into();
    let e = client.model_infer(r).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("model_version"), "{}", e.message());
    let mut r = plain(1);
    r.model_version = "1".into();
    client.model_infer(r).await.unwrap();
    let version = || "7".to_string();
    let e = client
        .model_ready(ModelReadyRequest {
            name: "passthrough".into(),
            version: version(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .model_metadata(ModelMetadataRequest {
            name: "passthrough".into(),
            version: version(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .model_statistics(ModelStatisticsRequest {
            name: "passthrough".into(),
            version: version(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Unloading what is not loaded is not worth retrying.
    let unload = |name: &str| RepositoryModelUnloadRequest {
        model_name: name.into(),
        ..Default::default()
    };
    client
        .repository_model_unload(unload("passthrough"))
        .await
        .unwrap();
    let e = client
        .repository_model_unload(unload("passthrough"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A failure on the stream: error_message is the plain message any KServe client can
    // show; the status code travels as a response parameter.
    let mut unknown = plain(1);
    unknown.model_name = "no-such-model".into();
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![unknown]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    assert!(
        reply.error_message.starts_with("model 'no-such-model'"),
        "{}",
        reply.error_message
    );
    let status = framecast_proto::status::from_stream_reply(&reply).unwrap();
    assert_eq!(status.code(), Code::NotFound);

    // Over the message limit: RESOURCE_EXHAUSTED as from gRPC core, unary and streaming.
    let big = plain(8);
    assert!(audio_len(8) + face_len(8) > 256 << 10);
    let e = client.model_infer(big.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![big]))
        .await
        .unwrap()
        .into_inner();
    let e = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}
