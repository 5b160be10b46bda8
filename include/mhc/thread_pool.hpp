// A small reusable pool of std::thread workers for the fused kernels.
//
// ThreadPool::run(count, task) calls task(index, worker) once for every index in [0, count) and
// returns when all calls have finished. The calling thread takes part, so a pool of size 1 has
// no extra threads. Indices are handed out dynamically, so which worker runs which index varies
// from call to call: a task's result must depend only on its index, never on `worker`, which
// exists to select per-worker scratch memory.
#pragma once

#include <mhc/common.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace mhc {

class ThreadPool {
 public:
  // Starts threads - 1 workers; the caller of run() is the remaining one. Throws
  // std::invalid_argument unless threads >= 1.
  explicit ThreadPool(int threads) {
    if (threads < 1) {
      detail::throw_invalid_argument("mhc::ThreadPool", "threads", "at least 1", detail::concat(threads));
    }
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int worker = 1; worker < threads; ++worker) {
      workers_.emplace_back([this, worker] { work(worker); });
    }
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_workers_.notify_all();
    for (std::thread& thread : workers_) thread.join();
  }

  // Number of threads that run tasks, the caller included.
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls task(index, worker) for index in [0, count), worker in [0, size()), and blocks until
  // every call has returned. `task` must not throw (an escaping exception calls std::terminate)
  // and must not call run() on the same pool. Calls from several threads at once are serialised.
  template <typename Task>
  void run(Eigen::Index count, Task&& task) {
    if (count <= 0) return;
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    if (workers_.empty() || count == 1) {
      for (Eigen::Index index = 0; index < count; ++index) task(index, 0);
      return;
    }

    using TaskType = std::remove_reference_t<Task>;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_.context = const_cast<void*>(static_cast<const void*>(&task));
      job_.invoke = [](void* context, Eigen::Index index, int worker) noexcept {
        (*static_cast<TaskType*>(context))(index, worker);
      };
      job_.count = count;
      next_index_.store(0, std::memory_order_relaxed);
      busy_workers_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_workers_.notify_all();

    drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    job_done_.wait(lock, [this] { return busy_workers_ == 0; });
  }

 private:
  struct Job {
    void* context = nullptr;
    void (*invoke)(void*, Eigen::Index, int) noexcept = nullptr;
    Eigen::Index count = 0;
  };

  // Runs indices of the current job until none is left.
  void drain(int worker) {
    for (;;) {
      const Eigen::Index index = next_index_.fetch_add(1, std::memory_order_relaxed);
      if (index >= job_.count) return;
      job_.invoke(job_.context, index, worker);
    }
  }

  void work(int worker) {
    std::uint64_t seen_generation = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_workers_.wait(lock, [&] { return stopping_ || generation_ != seen_generation; });
        if (stopping_) return;
        seen_generation = generation_;
      }
      drain(worker);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --busy_workers_;
      }
      job_done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex mutex_;  // guards job_, generation_, busy_workers_ and stopping_
  std::condition_variable wake_workers_;
  std::condition_variable job_done_;
  Job job_;
  std::atomic<Eigen::Index> next_index_{0};
  std::uint64_t generation_ = 0;
  int busy_workers_ = 0;
  bool stopping_ = false;
};

namespace detail {

// Runs task(index, worker) for every index in [0, count), on `pool` when there is one and on the
// calling thread (worker 0) otherwise.
template <typename Task>
void run_tasks(ThreadPool* pool, Eigen::Index count, Task&& task) {
  if (pool != nullptr) {
    pool->run(count, task);
    return;
  }
  for (Eigen::Index index = 0; index < count; ++index) task(index, 0);
}

}  // namespace detail
}  // namespace mhc
