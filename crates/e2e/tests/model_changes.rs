//! A model whose files change under running services: the inference service describes the
//! model it runs, and the compositor notices a reload with other shapes.

use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_compositor::render::RenderOptions;
use framecast_e2e::{request, spawn_compositor_with, spawn_inference, write_fixtures, CROP};
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use framecast_proto::kserve::{
    ModelMetadataRequest, RepositoryModelLoadRequest, RepositoryModelUnloadRequest,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_follows_the_loaded_model_and_the_compositor_notices_a_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 500);
    let inference = spawn_inference(&models, Default::default()).await;
    let mut kserve = GrpcInferenceServiceClient::connect(inference.url())
        .await
        .unwrap();
    let pool =
        InferenceClient::connect_lazy(&[inference.url()], &ClientOptions::default()).unwrap();
    let opts = RenderOptions {
        max_batch: 4,
        ..Default::default()
    };
    let compositor = spawn_compositor_with(&avatars, pool, opts, None, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();
    let render = |n: u32| {
        let mut c = client.clone();
        async move {
            let mut s = c
                .render(tokio_stream::iter(vec![request("small", 0, n)]))
                .await?
                .into_inner();
            let mut frames = 0;
            while s.message().await?.is_some() {
                frames += 1;
            }
            Ok::<u32, tonic::Status>(frames)
        }
    };
    assert_eq!(render(2).await.unwrap(), 2);
    let face_dims = |meta: &framecast_proto::kserve::ModelMetadataResponse| {
        meta.inputs
            .iter()
            .find(|t| t.name == "face")
            .unwrap()
            .shape
            .clone()
    };
    let metadata = |c: &mut GrpcInferenceServiceClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.model_metadata(ModelMetadataRequest {
                name: "passthrough".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let crop = CROP as i64;
    assert_eq!(face_dims(&metadata(&mut kserve).await), [-1, 6, crop, crop]);

    // The files change to a model of another crop size; the loaded model does not.
    let half = ZooOptions {
        crop: crop / 2,
        max_batch_size: 8,
        max_queue_delay_us: 500,
    };
    zoo::write(&models, Builtin::Passthrough, &half).unwrap();
    assert_eq!(
        face_dims(&metadata(&mut kserve).await),
        [-1, 6, crop, crop],
        "metadata must describe the model being served, not the files"
    );

    // Reloaded: the server now serves the new shapes. The compositor's first batch is
    // refused (its cached contract is stale); it then asks again and sees the new crop.
    let unload = RepositoryModelUnloadRequest {
        model_name: "passthrough".into(),
        ..Default::default()
    };
    kserve.repository_model_unload(unload).await.unwrap();
    let load = RepositoryModelLoadRequest {
        model_name: "passthrough".into(),
        ..Default::default()
    };
    kserve.repository_model_load(load).await.unwrap();
    assert_eq!(
        face_dims(&metadata(&mut kserve).await),
        [-1, 6, crop / 2, crop / 2]
    );
    let stale = render(2).await.unwrap_err();
    assert_eq!(stale.code(), Code::InvalidArgument, "{stale:?}");
    let fresh = render(2).await.unwrap_err();
    assert_eq!(fresh.code(), Code::FailedPrecondition, "{fresh:?}");
    assert!(fresh.message().contains("crop_size"), "{}", fresh.message());
}
