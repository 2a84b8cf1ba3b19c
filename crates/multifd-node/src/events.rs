//! Forwards data-plane events to one JavaScript callback per session.

use std::sync::{Arc, Mutex};

use multifd_core::session::{Event, EventSink};
use napi::bindgen_prelude::{Buffer, Function};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;

/// One event as JavaScript receives it. `kind` says which fields are set.
#[napi(object)]
pub struct NativeEvent {
    /// `failed` | `done` | `synced` | `channel` | `control` | `controlClosed` | `controlConnected` | `channelsReady` | `warning`
    pub kind: String,
    pub id: Option<u32>,
    pub pages: Option<f64>,
    pub epoch: Option<f64>,
    pub packet_num: Option<f64>,
    pub channel: Option<u32>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub frame: Option<Buffer>,
}

impl NativeEvent {
    fn of(kind: &str) -> Self {
        NativeEvent { kind: kind.into(), id: None, pages: None, epoch: None, packet_num: None, channel: None, code: None, message: None, frame: None }
    }

    fn with_error(mut self, e: &multifd_core::Error) -> Self {
        self.code = Some(e.code.as_str().into());
        self.message = Some(e.message.clone());
        self
    }
}

impl From<Event> for NativeEvent {
    fn from(e: Event) -> Self {
        match e {
            Event::Failed(err) => NativeEvent::of("failed").with_error(&err),
            Event::Done { id, result } => {
                let ev = NativeEvent { id: Some(id), ..NativeEvent::of("done") };
                match result {
                    Ok(pages) => NativeEvent { pages: Some(pages as f64), ..ev },
                    Err(err) => ev.with_error(&err),
                }
            }
            Event::Synced { epoch, packet_num } => NativeEvent { epoch: Some(epoch as f64), packet_num: Some(packet_num as f64), ..NativeEvent::of("synced") },
            Event::ChannelUp { id } => NativeEvent { channel: Some(id.into()), ..NativeEvent::of("channel") },
            Event::Control(frame) => NativeEvent { frame: Some(frame.into()), ..NativeEvent::of("control") },
            Event::ControlClosed(None) => NativeEvent::of("controlClosed"),
            Event::ControlClosed(Some(err)) => NativeEvent::of("controlClosed").with_error(&err),
            Event::ControlConnected => NativeEvent::of("controlConnected"),
            Event::ChannelsReady => NativeEvent::of("channelsReady"),
            Event::Warning(err) => NativeEvent::of("warning").with_error(&err),
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
