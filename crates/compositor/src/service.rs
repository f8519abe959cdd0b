//! The `framecast.compositor.v1.Compositor` gRPC service.

use crate::avatar_store::{AvatarError, AvatarStatus, AvatarStore};
use crate::inference::InferenceClient;
use crate::render::{self, RenderOptions};
use framecast_proto::compositor::v1::{
    compositor_server::Compositor, AvatarInfo, ListAvatarsRequest, ListAvatarsResponse,
    LoadAvatarRequest, LoadAvatarResponse, RenderRequest, RenderedFrame, UnloadAvatarRequest,
    UnloadAvatarResponse,
};
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
pub struct CompositorService {
    pub store: Arc<AvatarStore>,
    pub inference: InferenceClient,
    pub opts: Arc<RenderOptions>,
}

pub fn status_of(e: AvatarError) -> Status {
    match e {
        AvatarError::InvalidName(_) => Status::invalid_argument(e.to_string()),
        AvatarError::NotFound(_) => Status::not_found(e.to_string()),
        AvatarError::NotLoaded(_) => Status::failed_precondition(e.to_string()),
        AvatarError::LoadFailed { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn info(s: &AvatarStatus) -> AvatarInfo {
    let mut i = AvatarInfo {
        avatar_id: s.id.clone(),
        state: s.state.to_string(),
        reason: s.reason.clone(),
        ..Default::default()
    };
    if let Some(a) = &s.avatar {
        let m = &a.manifest;
        i.frame_count = a.frames.len() as u32;
        i.width = m.width;
        i.height = m.height;
        i.fps = m.fps;
        i.model = m.model.clone();
        i.resident_bytes = a.resident_bytes();
    }
    i
}

impl CompositorService {
    async fn render_one(&self, req: RenderRequest, sink: &render::FrameSink) -> Result<(), Status> {
        let avatar = self.store.get(&req.avatar_id).await.map_err(status_of)?;
        let model = self
            .inference
            .model_info(&avatar.manifest.model)
            .await
            .map_err(|s| {
                Status::new(
                    s.code(),
                    format!(
                        "model '{}' of avatar '{}': {}",
                        avatar.manifest.model,
                        avatar.manifest.id,
                        s.message()
                    ),
                )
            })?;
        render::render(req, avatar, model, &self.inference, &self.opts, sink).await
    }
}

#[tonic::async_trait]
impl Compositor for CompositorService {
    type RenderStream = ReceiverStream<Result<RenderedFrame, Status>>;

    async fn render(
        &self,
        req: Request<Streaming<RenderRequest>>,
    ) -> Result<Response<Self::RenderStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            // Requests on one stream render one after another, so frames leave in the order
            // they were asked for.
            while let Some(msg) = inbound.next().await {
                let req = match msg {
                    Ok(r) => r,
                    Err(_) => break,
                };
                if let Err(status) = this.render_one(req, &tx).await {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                if tx.is_closed() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn load_avatar(
        &self,
        req: Request<LoadAvatarRequest>,
    ) -> Result<Response<LoadAvatarResponse>, Status> {
        let id = req.into_inner().avatar_id;
        let avatar = self.store.load(&id).await.map_err(status_of)?;
        Ok(Response::new(LoadAvatarResponse {
            avatar: Some(info(&AvatarStatus {
                id,
                state: "ready",
                reason: String::new(),
                avatar: Some(avatar),
            })),
        }))
    }

    async fn unload_avatar(
        &self,
        req: Request<UnloadAvatarRequest>,
    ) -> Result<Response<UnloadAvatarResponse>, Status> {
        self.store
            .unload(&req.into_inner().avatar_id)
            .map_err(status_of)?;
        Ok(Response::new(UnloadAvatarResponse {}))
    }

    async fn list_avatars(
        &self,
        _: Request<ListAvatarsRequest>,
    ) -> Result<Response<ListAvatarsResponse>, Status> {
        let list = self
            .store
            .list()
            .map_err(|e| Status::internal(format!("reading the avatar root: {e}")))?;
        Ok(Response::new(ListAvatarsResponse {
            avatars: list.iter().map(info).collect(),
        }))
    }
}
