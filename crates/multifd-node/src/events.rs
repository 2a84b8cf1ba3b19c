//! Forwards data-plane events to one JavaScript callback per session, as a discriminated union
//! (`kind`) the binding generates: TypeScript narrows on `kind`, no casts.

use std::sync::{Arc, Mutex};

use multifd_core::control_messages::ControlMessage;
use multifd_core::session::{Event, EventSink};
use napi::bindgen_prelude::Function;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;

use crate::control_messages::NativeControlMessage;

/// A failure as it crosses to JavaScript: the stable `ERR_MULTIFD_*` code and the message.
#[napi(object)]
pub struct NativeError {
    pub code: String,
    pub message: String,
}

impl From<multifd_core::Error> for NativeError {
    fn from(e: multifd_core::Error) -> Self {
        NativeError { code: e.code.as_str().into(), message: e.message }
    }
}

/// One event of a native session.
#[napi(discriminant = "kind", discriminant_case = "camelCase")]
pub enum NativeEvent {
    /// The first error; the session is failed and its channels are shut down.
    Failed { error: NativeError },
    /// Request `id` finished: pages handled (a send) or the epoch reached (a sync).
    Done { id: u32, value: f64 },
    /// Request `id` ended with `error`.
    Rejected { id: u32, error: NativeError },
    /// Every channel passed sync barrier `epoch` (destination; the source was already told).
    Synced { epoch: f64, packet_num: f64 },
    /// Multifd channel `id` was admitted (destination) or connected (source).
    Channel { id: u32 },
    /// A control message from the peer, decoded and checked by the core.
    Control { message: NativeControlMessage },
    /// A control frame from the peer that is not a valid message (`ERR_MULTIFD_PROTOCOL`, or
    /// `ERR_MULTIFD_DUPLICATE_BLOCK` for a hello naming a block twice).
    ControlRefused { error: NativeError },
    /// The control connection ended: cleanly (no `error`) or with `error`.
    ControlClosed { error: Option<NativeError> },
    /// The control connection is up (source: connected and authenticated; destination: accepted).
    ControlConnected,
    /// Source: every channel is connected and has sent its init packet.
    ChannelsReady,
    /// Something degraded without failing the session.
    Warning { error: NativeError },
    /// A broken connection was replaced: channel `connection`, or the control connection
    /// (absent); `ms` from the break being noticed to the replacement carrying traffic.
    Recovered { connection: Option<u32>, cause: NativeError, pages_resent: f64, ms: f64 },
}

impl From<Event> for NativeEvent {
    fn from(e: Event) -> Self {
        match e {
            Event::Failed(err) => NativeEvent::Failed { error: err.into() },
            Event::Done { id, result: Ok(value) } => NativeEvent::Done { id, value: value as f64 },
            Event::Done { id, result: Err(err) } => NativeEvent::Rejected { id, error: err.into() },
            Event::Synced { epoch, packet_num } => NativeEvent::Synced { epoch: epoch as f64, packet_num: packet_num as f64 },
            Event::ChannelUp { id } => NativeEvent::Channel { id: id.into() },
            Event::Control(frame) => match ControlMessage::decode(&frame) {
                Ok(m) => NativeEvent::Control { message: m.into() },
                Err(err) => NativeEvent::ControlRefused { error: err.into() },
            },
            Event::ControlClosed(err) => NativeEvent::ControlClosed { error: err.map(Into::into) },
            Event::ControlConnected => NativeEvent::ControlConnected,
            Event::ChannelsReady => NativeEvent::ChannelsReady,
            Event::Warning(err) => NativeEvent::Warning { error: err.into() },
            Event::Recovered(r) => NativeEvent::Recovered {
                connection: r.connection.map(u32::from),
                cause: r.cause.into(),
                pages_resent: r.pages_resent as f64,
                ms: r.took.as_secs_f64() * 1000.0,
            },
        }
    }
}

type Tsfn = ThreadsafeFunction<NativeEvent, (), NativeEvent, Status, false>;

/// The JavaScript end of a session's events. Holding the threadsafe function keeps Node's
/// event loop alive while the session runs; `release` lets it go once every thread is joined.
#[derive(Clone)]
pub struct JsEvents {
    tsfn: Arc<Mutex<Option<Tsfn>>>,
}

impl JsEvents {
    pub fn new(callback: Function<NativeEvent, ()>) -> napi::Result<Self> {
        let tsfn = callback.build_threadsafe_function::<NativeEvent>().callee_handled::<false>().build()?;
        Ok(JsEvents { tsfn: Arc::new(Mutex::new(Some(tsfn))) })
    }

    pub fn sink(&self) -> EventSink {
        let tsfn = self.tsfn.clone();
        Arc::new(move |e: Event| {
            if let Some(f) = tsfn.lock().unwrap().as_ref() {
                f.call(e.into(), ThreadsafeFunctionCallMode::NonBlocking);
            }
        })
    }

    pub fn release(&self) {
        self.tsfn.lock().unwrap().take();
    }
}
