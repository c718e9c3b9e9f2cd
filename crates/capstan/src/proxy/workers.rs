//! The proxy's data path runs nginx's way: one single-threaded runtime per CPU,
//! each with its own `SO_REUSEPORT` listener for every published port (the
//! kernel spreads connections over them) and its own idle connections to each
//! replica ([`super::pool::Pool`]). A request then stays on one thread from the
//! client's socket to the replica's and back: no task hops between threads and
//! no cross-thread wake-ups on the hot path.

use std::sync::OnceLock;

use tokio::runtime::Handle;

thread_local! {
    /// This thread's index among the workers; `None` off them.
    static INDEX: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The proxy's worker threads, started on first use, living as long as the
/// process.
pub struct Workers {
    handles: Vec<Handle>,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

impl Workers {
    /// One worker per CPU (at least one, at most 64).
    pub fn get() -> &'static Workers {
        WORKERS.get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
            let handles = (0..n)
                .map(|i| {
                    let (tx, rx) = std::sync::mpsc::channel();
                    std::thread::Builder::new()
                        .name(format!("capstan-proxy-{i}"))
                        .spawn(move || {
                            INDEX.with(|c| c.set(Some(i)));
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .expect("a proxy worker runtime");
                            let _ = tx.send(rt.handle().clone());
                            rt.block_on(std::future::pending::<()>());
                        })
                        .expect("a proxy worker thread");
                    rx.recv().expect("a proxy worker runtime")
                })
                .collect();
            Workers { handles }
        })
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many there are (at least one).
    pub fn count(&self) -> usize {
        self.handles.len()
    }
}

/// This thread's worker index, or `None` off the workers.
pub fn index() -> Option<usize> {
    INDEX.with(|c| c.get())
}
