//! The embedded store's reader threads: a few threads of its own that run its reads, one
//! queue for all of them.
//!
//! Why not tokio's blocking pool: a redb read of a short stream, a snapshot or a page of the
//! change log takes a few microseconds, and `spawn_blocking` wakes a pool thread for each one
//! (and keeps up to hundreds of them). A profile of `esq dev` under AddItem at c16 put about a
//! fifth of the process's CPU in those threads' futex waits and wake-ups, against 2% in the
//! reads themselves. Here a thread that finishes a read takes the next one queued without
//! sleeping, and a read queued while every thread is busy wakes nobody, so under load the
//! reads of concurrent requests run back to back on the threads already awake.
//!
//! Bounded: at most [`READ_QUEUE_CAPACITY`] reads queued or running; further callers wait
//! (asynchronously) for room. A read that panics answers its caller with an error and the
//! thread goes on. The threads end when the pool is dropped (the last clone of the store).

use crate::StoreError;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use tokio::sync::{oneshot, Semaphore};

/// Most reads queued or running at once; callers beyond it wait for room.
pub const READ_QUEUE_CAPACITY: usize = 1024;

/// Reader threads of a store: the machine's parallelism, at least 2 (a read that waits for
/// the disk does not hold up every other) and at most 4 (reads are short; more threads only
/// add wake-ups).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4)
}

type Job = Box<dyn FnOnce() + Send>;

/// The queue the threads share.
struct Queue {
    state: Mutex<State>,
    ready: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads waiting on `ready`.
    idle: usize,
    /// Wake-ups sent that no thread has taken yet: a push wakes a thread only if more are
    /// idle than already woken.
    waking: usize,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A thread's loop: run queued jobs until the pool is closed and the queue is empty.
    fn serve(&self) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                drop(state);
                // A job answers its own panics (see `Readers::run`); this only keeps the thread
                // alive should anything else in it unwind.
                let _ = catch_unwind(AssertUnwindSafe(job));
                state = self.lock();
                continue;
            }
            if state.closed {
                return;
            }
            state.idle += 1;
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            state.idle -= 1;
            state.waking = state.waking.saturating_sub(1);
        }
    }
}

/// A pool of reader threads (see the module docs).
pub struct Readers {
    queue: Arc<Queue>,
    room: Arc<Semaphore>,
}

impl Readers {
    /// Starts `threads` (at least one) reader threads named `esq-redb-reader`.
    pub fn start(threads: usize) -> Result<Self, StoreError> {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            ready: Condvar::new(),
        });
        let pool = Self {
            queue: Arc::clone(&queue),
            room: Arc::new(Semaphore::new(READ_QUEUE_CAPACITY)),
        };
        for _ in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            // On failure `pool` is dropped, which closes the queue and ends any thread started.
            std::thread::Builder::new()
                .name("esq-redb-reader".into())
                .spawn(move || queue.serve())
                .map_err(|e| StoreError::Internal(format!("cannot start a reader thread: {e}")))?;
        }
        Ok(pool)
    }

    /// Runs `f` on a reader thread and waits (asynchronously) for its answer.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    {
        let permit = Arc::clone(&self.room)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Internal("the embedded store's readers are closed".into()))?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let answer = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
                Err(StoreError::Internal(
                    "an embedded store read panicked".into(),
                ))
            });
            drop(permit);
            // A caller that gave up has dropped its receiver: nothing to tell.
            let _ = tx.send(answer);
        });
        self.push(job);
        rx.await
            .map_err(|_| StoreError::Internal("an embedded store read was dropped".into()))?
    }
}

impl Readers {
    /// Queues `job`, waking a thread only if one is idle and not already being woken.
    fn push(&self, job: Job) {
        let wake = {
            let mut state = self.queue.lock();
            state.jobs.push_back(job);
            let wake = state.idle > state.waking;
            if wake {
                state.waking += 1;
            }
            wake
        };
        if wake {
            self.queue.ready.notify_one();
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_all_answer_on_the_pools_threads() {
        let readers = Arc::new(Readers::start(2).unwrap());
        let tasks: Vec<_> = (0..200u64)
            .map(|i| {
                let readers = Arc::clone(&readers);
                tokio::spawn(async move {
                    readers
                        .run(move || {
                            let name = std::thread::current().name().map(str::to_owned);
                            Ok((i * 2, name))
                        })
                        .await
                })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let (doubled, thread) = answered(task).await.unwrap().unwrap();
            assert_eq!(doubled, 2 * i as u64);
            assert_eq!(thread.as_deref(), Some("esq-redb-reader"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_read_answers_with_an_error_and_the_thread_goes_on() {
        let readers = Readers::start(1).unwrap();
        let err = answered(readers.run(|| -> Result<(), StoreError> { panic!("boom") }))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Internal(ref m) if m.contains("panicked")));
        assert_eq!(answered(readers.run(|| Ok(7))).await.unwrap(), 7);
    }

    /// A read's answer, or a failure after a generous bound instead of a hung test.
    async fn answered<T>(read: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("a read got no answer within 60 s")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_read_does_not_hold_up_the_others_with_two_threads() {
        let readers = Arc::new(Readers::start(2).unwrap());
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let slow = {
            let readers = Arc::clone(&readers);
            tokio::spawn(async move {
                readers
                    .run(move || {
                        started_tx.send(()).unwrap();
                        held.recv_timeout(Duration::from_secs(60)).ok();
                        Ok(())
                    })
                    .await
            })
        };
        // The slow read holds one thread before the others are queued.
        tokio::task::spawn_blocking(move || started.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("the slow read never started");
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..20 {
            let done = Arc::clone(&done);
            answered(readers.run(move || {
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }))
            .await
            .unwrap();
        }
        assert_eq!(done.load(Ordering::Relaxed), 20);
        release.send(()).unwrap();
        answered(slow).await.unwrap().unwrap();
    }

    #[test]
    fn jobs_queued_when_the_pool_is_dropped_still_run() {
        let readers = Readers::start(1).unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (tx, ran) = std::sync::mpsc::channel::<u32>();
        let tx2 = tx.clone();
        readers.push(Box::new(move || {
            held.recv_timeout(Duration::from_secs(60)).ok();
            tx.send(1).unwrap();
        }));
        readers.push(Box::new(move || tx2.send(2).unwrap()));
        // The pool goes while its only thread holds the first job and the second is queued.
        drop(readers);
        release.send(()).unwrap();
        let wait = Duration::from_secs(60);
        assert_eq!(ran.recv_timeout(wait), Ok(1));
        assert_eq!(ran.recv_timeout(wait), Ok(2));
    }

    #[test]
    fn the_threads_end_with_the_pool() {
        let readers = Readers::start(3).unwrap();
        let queue = Arc::downgrade(&readers.queue);
        drop(readers);
        // Each thread holds the queue until it returns.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while queue.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "reader threads still running"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
