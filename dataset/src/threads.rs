//! Background threads that call into libtorch without taking CPUs from the training step.
//!
//! libtorch runs any element-wise operation over 32,768 elements with OpenMP, and the
//! first parallel region a thread starts gives that thread an OpenMP team of its own. A
//! loader thread that pads a batch (a zero-filled tensor of frames x 80) thus adds an
//! OpenMP thread that lives as long as the loader thread. Once libgomp manages more
//! threads than there are CPUs it stops spinning between parallel regions (its
//! "throttled" spin count), and every parallel region of the training step then pays a
//! futex sleep and wake-up. On 2 cores (configs/multilingual-wenet.yaml, 2 threads) that
//! was a fifth of the step's CPU time in the kernel's scheduler, and 2 threads trained
//! slower than 1; see bench/RESULTS.md.

/// Makes libtorch run the calling thread's operations on that thread alone: call it first
/// in every long-lived thread that creates or copies tensors outside the training step.
pub fn serial_libtorch() {
    // libtorch sets a thread's OpenMP thread count when the thread first asks for it
    // (from the process-wide setting); asking first keeps it from overwriting ours.
    let _ = tch::get_num_threads();
    // SAFETY: looks a C function up by name among the libraries already loaded;
    // omp_set_num_threads(int) has this signature in every OpenMP runtime, and it sets
    // the calling thread's own count only.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"omp_set_num_threads".as_ptr());
        if !f.is_null() {
            let set: extern "C" fn(libc::c_int) = std::mem::transmute(f);
            set(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::serial_libtorch;
    use tch::{Kind, Tensor};

    /// Threads of this process named `name` (OpenMP's threads take their master's name).
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// Starts a thread named `name`, has it fill and sum a large tensor (a parallel
    /// region where libtorch runs more than one thread) and returns what it saw: its
    /// libtorch thread count and how many threads carry its name.
    fn probe(name: &'static str, serial: bool) -> (i32, usize) {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if serial {
                    serial_libtorch();
                }
                let t = Tensor::ones([1 << 22], (Kind::Float, tch::Device::Cpu));
                assert_eq!(t.sum(Kind::Float).double_value(&[]), (1 << 22) as f64);
                (tch::get_num_threads(), threads_named(name))
            })
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn a_serial_thread_starts_no_openmp_team() {
        // The control: without the call a thread gets a team wherever libtorch would use
        // more than one thread (not on a one-CPU machine, where there is nothing to see).
        let (threads, named) = probe("ut-parallel", false);
        if threads > 1 {
            assert!(
                named > 1,
                "{threads} libtorch threads but no OpenMP team was seen"
            );
        }
        assert_eq!(probe("ut-serial", true), (1, 1));
        // The calling thread's setting only: the others keep theirs.
        let (after, _) = probe("ut-parallel-2", false);
        assert_eq!(after, threads);
    }
}
