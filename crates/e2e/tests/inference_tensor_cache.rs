//! The tensor cache extension against the real inference server: register once, name rows
//! in requests, the same answer as sending the rows; unknown names, bad rows, the budget and
//! authentication get precise statuses.

use bytes::Bytes;
use framecast_e2e::{kserve_client, spawn_inference, spawn_inference_with};
use framecast_inference::server::ServeOptions;
use framecast_inference::tensor_cache::{TensorLimits, ENTRY_OVERHEAD};
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use framecast_proto::kserve::infer_parameter::ParameterChoice;
use framecast_proto::kserve::model_infer_request::InferInputTensor;
use framecast_proto::kserve::{InferParameter, ModelInferRequest, ServerMetadataRequest};
use framecast_proto::tensor::DataType;
use framecast_proto::tensorcache::v1::tensor_cache_client::TensorCacheClient;
use framecast_proto::tensorcache::v1::{RegisterRequest, StatusRequest, UnregisterRequest};
use framecast_proto::tensorcache::{EXTENSION, PARAM_ROWS, PARAM_TENSOR};
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::Code;

const CROP: i64 = 16;
const ROWS: usize = 5;
const ROW: usize = 6 * (CROP * CROP) as usize;

fn faces() -> Bytes {
    (0..ROWS * ROW)
        .map(|i| (i as u8).wrapping_mul(37) ^ (i / ROW) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn text(s: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(s.into())),
    }
}

/// A passthrough request for `rows` of the registered faces, or (`by_value`) of the same rows
/// sent as bytes.
fn request(rows: &[usize], by_value: bool) -> ModelInferRequest {
    let b = rows.len() as i64;
    let mut face = InferInputTensor::new("face", DataType::U8, vec![b, 6, CROP, CROP]);
    let audio = InferInputTensor::new("audio", DataType::F32, vec![b, 32, 16, 16]);
    let mut raw = vec![Bytes::from(vec![0u8; rows.len() * 32 * 16 * 16 * 4])];
    if by_value {
        let all = faces();
        let bytes: Vec<u8> = rows
            .iter()
            .flat_map(|&r| all[r * ROW..(r + 1) * ROW].to_vec())
            .collect();
        raw.insert(0, Bytes::from(bytes));
    } else {
        let list: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        face.parameters.insert(PARAM_TENSOR.into(), text("faces"));
        face.parameters
            .insert(PARAM_ROWS.into(), text(&list.join(",")));
    }
    ModelInferRequest {
        model_name: "passthrough".into(),
        inputs: vec![face, audio],
        raw_input_contents: raw,
        ..Default::default()
    }
}

fn register(name: &str, data: Bytes) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        datatype: "UINT8".into(),
        shape: vec![(data.len() / ROW) as i64, 6, CROP, CROP],
        data,
        first_row: 0,
    }
}

/// A repository holding `passthrough` at S = [`CROP`].
fn repository() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = ZooOptions {
        crop: CROP,
        max_batch_size: 8,
        max_queue_delay_us: 0,
    };
    zoo::write(tmp.path(), Builtin::Passthrough, &zoo).unwrap();
    tmp
}

async fn start(opts: ServeOptions) -> (tempfile::TempDir, framecast_inference::server::Running) {
    let tmp = repository();
    let server = spawn_inference(tmp.path(), opts).await;
    (tmp, server)
}

async fn cache_client(url: String) -> TensorCacheClient<Channel> {
    TensorCacheClient::connect(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_named_by_index_give_the_answer_rows_sent_by_value_give() {
    let (_tmp, server) = start(Default::default()).await;
    let mut kserve = kserve_client(server.url()).await;
    let mut cache = cache_client(server.url()).await;
    let meta = kserve
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(meta.extensions.iter().any(|e| e == EXTENSION), "{meta:?}");
    let size = cache
        .register(register("faces", faces()))
        .await
        .unwrap()
        .into_inner()
        .byte_size;
    assert_eq!(size as usize, ROWS * ROW);
    let rows = [4, 0, 2, 2];
    let by_index = kserve
        .model_infer(request(&rows, false))
        .await
        .unwrap()
        .into_inner();
    let by_value = kserve
        .model_infer(request(&rows, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_index.raw_output_contents, by_value.raw_output_contents);
    // The request carried indices: a few bytes instead of four rows.
    let size = |r: &ModelInferRequest| prost::Message::encoded_len(r);
    let saved = size(&request(&rows, true)) - size(&request(&rows, false));
    assert!(saved > 4 * ROW - 64, "{saved} bytes saved");
    // The same tensor in two parts answers the same.
    let all = faces();
    for (first, rows) in [(0usize, 0..3usize), (3, 3..ROWS)] {
        let mut part = register("faces", all.slice(rows.start * ROW..rows.end * ROW));
        part.shape = vec![ROWS as i64, 6, CROP, CROP];
        part.first_row = first as u64;
        cache.register(part).await.unwrap();
    }
    let parts = kserve
        .model_infer(request(&rows, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parts.raw_output_contents, by_value.raw_output_contents);
    let status = cache.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.tensors.len(), 1);
    assert_eq!(status.tensors[0].shape, vec![ROWS as i64, 6, CROP, CROP]);
    assert_eq!(status.bytes_used, (ROWS * ROW) as u64 + ENTRY_OVERHEAD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_bad_rows_and_the_budget_get_precise_statuses() {
    let budget = (ROWS * ROW) as u64 + ENTRY_OVERHEAD + 10;
    let opts = ServeOptions {
        tensor_cache: TensorLimits {
            client_bytes: budget,
            ..TensorLimits::new(budget)
        },
        ..Default::default()
    };
    let (_tmp, server) = start(opts).await;
    let mut kserve = kserve_client(server.url()).await;
    let mut cache = cache_client(server.url()).await;
    // Not registered: NOT_FOUND with the reason a client acts on.
    let e = kserve.model_infer(request(&[0], false)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        framecast_proto::status::reason(&e),
        Some(framecast_proto::status::REASON_TENSOR_UNKNOWN)
    );
    assert!(e.message().contains("'faces'"), "{}", e.message());
    cache.register(register("faces", faces())).await.unwrap();
    let e = kserve
        .model_infer(request(&[1, 5], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("framecast_rows[1] = 5"),
        "{}",
        e.message()
    );
    // Past the budget the least recently used tensor is evicted: a request naming it is told
    // to register again, and can.
    cache.register(register("more", faces())).await.unwrap();
    let e = kserve.model_infer(request(&[3], false)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    cache.register(register("faces", faces())).await.unwrap();
    kserve.model_infer(request(&[3], false)).await.unwrap();
    // Larger than the whole budget: refused with the numbers.
    let big = Bytes::from(vec![0u8; 2 * ROWS * ROW]);
    let e = cache.register(register("huge", big)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains(&format!(
            "{} bytes",
            2 * ROWS * ROW + ENTRY_OVERHEAD as usize
        )),
        "{}",
        e.message()
    );
    // Bad registrations name the field.
    let mut bad = register("x", faces());
    bad.shape = vec![ROWS as i64, 6, CROP];
    let e = cache.register(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("data:"), "{}", e.message());
    let e = cache.register(register("../x", faces())).await.unwrap_err();
    assert!(e.message().starts_with("name"), "{}", e.message());
    // Unregistered: the next request is told to register again.
    cache
        .unregister(UnregisterRequest {
            name: "faces".into(),
        })
        .await
        .unwrap();
    let e = kserve.model_infer(request(&[0], false)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// Models and tensors share the device-memory budget: a registration evicts the least
/// recently used idle model, a model load the least recently used idle tensor (never one a
/// request is using), and a tensor larger than the device budget is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_tensors_make_room_for_each_other_under_one_budget() {
    use framecast_inference::metrics::Metrics;
    use framecast_inference::models::ExecOptions;
    let tmp = repository();
    // The model is charged about 1 MiB (its overhead; its file is a few KB), the budget
    // holds 1.5 MiB.
    let exec = ExecOptions {
        memory_budget: Some(3 << 19),
        model_overhead: 1 << 20,
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new());
    let server = spawn_inference_with(tmp.path(), exec, metrics.clone(), Default::default()).await;
    let mut kserve = kserve_client(server.url()).await;
    let mut cache = cache_client(server.url()).await;
    kserve.model_infer(request(&[0], true)).await.unwrap();
    let model = metrics.memory_used_bytes.get() as u64;
    assert!(
        model > 1 << 20 && model < 5 << 18,
        "model charged {model} bytes"
    );
    cache.register(register("faces", faces())).await.unwrap();
    // 600 KB more does not fit beside the model: the model (least recently used) goes.
    let big = Bytes::from(vec![1u8; 400 * ROW]);
    cache.register(register("big", big)).await.unwrap();
    assert_eq!(metrics.evictions.get(), 1, "the model was not evicted");
    assert_eq!(metrics.memory_used_bytes.get(), 0);
    // A request naming the faces loads the model again: the idle 'big' makes room, not the
    // faces the request holds.
    let by_index = kserve.model_infer(request(&[2, 4], false)).await.unwrap();
    let by_value = kserve.model_infer(request(&[2, 4], true)).await.unwrap();
    assert_eq!(
        by_index.into_inner().raw_output_contents,
        by_value.into_inner().raw_output_contents
    );
    let e = kserve.model_infer(big_request()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "'big' was not evicted: {e:?}");
    // Larger than the device budget: refused with the numbers, naming that budget.
    let huge = Bytes::from(vec![0u8; 1100 * ROW]);
    let e = cache.register(register("huge", huge)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("--memory-budget-mib")
            && e.message().contains(&format!("{}", 3 << 19)),
        "{}",
        e.message()
    );
}

/// A request for row 0 of the tensor "big".
fn big_request() -> ModelInferRequest {
    let mut req = request(&[0], false);
    req.inputs[0]
        .parameters
        .insert(PARAM_TENSOR.into(), text("big"));
    req
}

/// With authentication on, registering needs a token, and each token's names are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_has_its_own_names() {
    let opts = ServeOptions {
        auth_token: Some("alice,bob".into()),
        ..Default::default()
    };
    let (_tmp, server) = start(opts).await;
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with = |token: &'static str| {
        move |mut r: tonic::Request<()>| {
            if !token.is_empty() {
                let v = format!("Bearer {token}").parse().unwrap();
                r.metadata_mut().insert("authorization", v);
            }
            Ok(r)
        }
    };
    let mut anon = TensorCacheClient::with_interceptor(channel.clone(), with(""));
    let e = anon.register(register("faces", faces())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut alice = TensorCacheClient::with_interceptor(channel.clone(), with("alice"));
    alice.register(register("faces", faces())).await.unwrap();
    let mut bob_infer = framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient::with_interceptor(channel.clone(), with("bob"));
    let e = bob_infer
        .model_infer(request(&[0], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "bob must not see alice's tensor");
    let mut alice_infer = framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient::with_interceptor(channel, with("alice"));
    alice_infer.model_infer(request(&[0], false)).await.unwrap();
}

/// An image output asked for as I420 is the RGB answer converted (half the bytes), with its
/// shape and format said; a wrong format or a non-image output is refused, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_output_comes_as_i420_when_asked() {
    use framecast_proto::i420;
    use framecast_proto::kserve::model_infer_request::InferRequestedOutputTensor;
    let (_tmp, server) = start(Default::default()).await;
    let mut kserve = kserve_client(server.url()).await;
    let meta = kserve
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(meta.extensions.iter().any(|e| e == i420::EXTENSION));
    let rgb = kserve
        .model_infer(request(&[1, 3], true))
        .await
        .unwrap()
        .into_inner();
    let ask = |format: &str| {
        let mut r = request(&[1, 3], true);
        r.outputs = vec![InferRequestedOutputTensor {
            name: "output".into(),
            parameters: [(i420::PARAM_FORMAT.to_string(), text(format))].into(),
        }];
        r
    };
    let yuv = kserve.model_infer(ask("i420")).await.unwrap().into_inner();
    let (s, n) = (CROP as usize, 2);
    assert_eq!(
        yuv.outputs[0].shape,
        vec![n as i64, (s * 3 / 2) as i64, s as i64]
    );
    assert_eq!(
        yuv.raw_output_contents[0],
        i420::from_planar_rgb(&rgb.raw_output_contents[0], n, s, s)
    );
    assert_eq!(
        yuv.raw_output_contents[0].len() * 2,
        rgb.raw_output_contents[0].len()
    );
    let e = kserve.model_infer(ask("nv12")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("outputs[0] 'output'"),
        "{}",
        e.message()
    );
}
