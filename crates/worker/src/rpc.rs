//! The worker's side of the protocol: each method becomes a command to the engine thread.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jsonrpsee::PendingSubscriptionSink;
use jsonrpsee::core::{RpcResult, SubscriptionResult, async_trait};
use mlx_serving_protocol::{
    GenerateEvent, GenerateRequest, Handshake, ModelInfo, ShutdownAck, Stats, Unloaded, WorkerRpcServer,
};
use tokio::sync::mpsc;

use crate::engine::{Command, EngineHandle};

pub struct Worker {
    pub engine: EngineHandle,
    pub handshake: Handshake,
}

#[async_trait]
impl WorkerRpcServer for Worker {
    async fn handshake(&self) -> RpcResult<Handshake> {
        Ok(self.handshake.clone())
    }

    async fn load_model(&self, model: String, path: String) -> RpcResult<ModelInfo> {
        self.engine.call(|reply| Command::Load { model, path: PathBuf::from(path), reply }).await
    }

    async fn unload_model(&self, model: String) -> RpcResult<Unloaded> {
        self.engine.call(|reply| Command::Unload { model, reply }).await
    }

    async fn list_models(&self) -> RpcResult<Vec<ModelInfo>> {
        self.engine.call(|reply| Command::List { reply }).await
    }

    async fn generate(&self, pending: PendingSubscriptionSink, request: GenerateRequest) -> SubscriptionResult {
        let arrived = Instant::now();
        let (events, mut rx) = mpsc::unbounded_channel();
        if let Err(e) = self.engine.call(|reply| Command::Generate { request, arrived, events, reply }).await {
            pending.reject(e).await;
            return Ok(());
        }
        // If accepting fails, dropping `rx` tells the engine to cancel the request.
        let sink = pending.accept().await?;
        loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    let last = matches!(event, GenerateEvent::Final(_));
                    let msg = serde_json::value::to_raw_value(&event)?;
                    if sink.send(msg).await.is_err() || last {
                        break;
                    }
                }
                // The caller unsubscribed: dropping `rx` cancels at the next decode step.
                _ = sink.closed() => break,
            }
        }
        Ok(())
    }

    async fn cancel(&self, id: String) -> RpcResult<bool> {
        self.engine.call(|reply| Command::Cancel { id, reply }).await
    }

    async fn stats(&self) -> RpcResult<Stats> {
        self.engine.call(|reply| Command::Stats { reply }).await
    }

    async fn shutdown(&self, deadline_ms: u64) -> RpcResult<ShutdownAck> {
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        self.engine.call(|reply| Command::Shutdown { deadline, reply }).await
    }
}
