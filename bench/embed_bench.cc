// Served Embed throughput against an in-process LibTorch forward of the same
// TorchScript module, and served Classify against an in-process forward of
// the same model exported by ExportModel, with the same threads and batch
// size, measured side by side in one run, at the backbone's input size.
// Prints a table of images/s and the ratio to the in-process row above.
//
//   embed_bench --backbone=resnet50.pt [--batch=32] [--batches=8] [--threads=N]
//               [--device=cpu|cuda] [--precision=fp32|bf16|fp16] [--image=FILE.jpg|png]
// Classify is measured when --image is given (its model is trained on it).
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/lib/client.h"
#include "server/api/server.h"

ABSL_FLAG(std::string, backbone, "", "TorchScript backbone");
ABSL_FLAG(int, batch, 32, "batch size: in-process batch and the server's --max_batch_size");
ABSL_FLAG(int, batches, 4, "timed batches per mode and round (after warm-up)");
ABSL_FLAG(int, rounds, 3, "rounds; each runs every mode once, in turn");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads (0: the machine's cores)");
ABSL_FLAG(int, clients, 2, "concurrent clients for the served modes, each sending whole batches");
ABSL_FLAG(std::string, device, "cpu", "cpu | cuda | cuda:N");
ABSL_FLAG(std::string, precision, "fp32", "fp32 | bf16 | fp16");
ABSL_FLAG(std::string, image, "",
          "a JPEG or PNG to send in the encoded-image modes (skipped if empty)");

namespace tlserve {
namespace {

struct Row {
  std::string mode;
  int64_t images;
  double seconds;
  double batches = 0;     // forwards run by the server (served modes)
  bool baseline = false;  // in-process: later rows' ratios are to this one
};

double BatchCount(Metrics& m) {
  return static_cast<double>(m.batch_size().Collect().histogram.sample_count);
}

void Sync(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// Loads the module once; each call times `batches` forwards.
std::function<Row()> InProcess(const std::string& mode, const std::string& path, int batch,
                               int batches, int64_t crop, const std::string& device,
                               const std::string& precision) {
  torch::Device dev = device == "cpu" ? torch::Device(torch::kCPU) : torch::Device(device);
  const auto dtype = precision == "bf16"   ? torch::kBFloat16
                     : precision == "fp16" ? torch::kHalf
                                           : torch::kFloat;
  auto m = std::make_shared<torch::jit::Module>(torch::jit::load(path, dev));
  m->eval();
  m->to(dtype);
  c10::InferenceMode guard;
  torch::Tensor x = torch::randn({batch, 3, crop, crop}).to(dev, dtype);
  if (dtype != torch::kFloat) {
    x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    for (const auto& p : m->parameters()) {
      if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
    }
  }
  // TorchScript's profiling executor optimises on the second run: warm up past it.
  for (int i = 0; i < 3; ++i) m->forward({x});
  Sync(dev);
  return [m, x, dev, batch, batches, mode] {
    c10::InferenceMode guard;
    const absl::Time start = absl::Now();
    for (int i = 0; i < batches; ++i) m->forward({x});
    Sync(dev);
    return Row{mode, int64_t{batch} * batches, absl::ToDoubleSeconds(absl::Now() - start), 0, true};
  };
}

// One request of `batch` copies of `image`: Embed, or Classify with `model`.
std::function<absl::Status()> Request(Client& client, const v1::Image& image, int batch,
                                      const std::string& model) {
  if (model.empty()) {
    auto req = std::make_shared<v1::EmbedRequest>();
    for (int i = 0; i < batch; ++i) *req->add_images() = image;
    return [&client, req] { return client.Embed(*req).status(); };
  }
  auto req = std::make_shared<v1::ClassifyRequest>();
  req->set_model(model);
  req->set_top_k(1);
  for (int i = 0; i < batch; ++i) *req->add_images() = image;
  return [&client, req] { return client.Call(&v1::Models::Stub::Classify, *req).status(); };
}

// Each call times about `batches` batches' worth of requests from `clients`
// threads, each request a whole batch (so that the server's batches are the
// in-process batch size); several clients keep the batcher fed.
std::function<Row()> Served(Server& server, const std::string& mode,
                            std::function<absl::Status()> request, int batch, int batches,
                            int clients) {
  const int per_request = batch;
  const int requests = std::max(1, batches / clients);
  auto run = [request, clients, mode](int n) {
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&] {
        for (int r = 0; r < n; ++r) {
          if (absl::Status s = request(); !s.ok()) {
            std::fprintf(stderr, "%s failed: %s\n", mode.c_str(), s.ToString().c_str());
            std::exit(1);
          }
        }
      });
    }
    for (auto& t : threads) t.join();
  };
  run(2);  // warm-up
  return [&server, run, mode, requests, clients, per_request] {
    const double batches_before = BatchCount(server.metrics());
    const absl::Time start = absl::Now();
    run(requests);
    return Row{mode, int64_t{requests} * clients * per_request,
               absl::ToDoubleSeconds(absl::Now() - start),
               BatchCount(server.metrics()) - batches_before};
  };
}

// A model to classify with: trained on copies of `image` (labels
// alternating, so the head learns nothing; Classify costs the same), then
// exported for the in-process baseline. Returns the exported file's path.
absl::StatusOr<std::string> MakeModel(Client& client, const v1::Image& image) {
  auto up =
      client.UploadDataset("bench", false, 8, 8, [&](size_t i) -> absl::StatusOr<v1::Example> {
        v1::Example e;
        e.set_name(absl::StrCat("copy", i));
        e.set_label(i % 2 ? "a" : "b");
        e.set_encoded(image.encoded());
        return e;
      });
  if (!up.ok()) return up.status();
  v1::CreateModelRequest create;
  create.set_name("bench");
  create.set_dataset("bench");
  if (auto m = client.Call(&v1::Models::Stub::CreateModel, create); !m.ok()) return m.status();
  v1::StartTrainingRequest train;
  train.set_model("bench");
  train.set_dataset("bench");
  auto job = client.Call(&v1::Models::Stub::StartTraining, train);
  if (!job.ok()) return job.status();
  grpc::ClientContext ctx;
  absl::Status watched = client.WatchJob(job->id(), &ctx, [&](const v1::Job& j) { *job = j; });
  if (!watched.ok()) return watched;
  if (job->state() != v1::Job::SUCCEEDED) return absl::InternalError(job->error());
  const std::string path = "/tmp/tlserve-bench-classifier.pt";
  if (auto info = client.ExportModel("bench", 0, path); !info.ok()) return info.status();
  return path;
}

int Main() {
  const std::string path = absl::GetFlag(FLAGS_backbone);
  const int batch = absl::GetFlag(FLAGS_batch), batches = absl::GetFlag(FLAGS_batches);
  const int threads = absl::GetFlag(FLAGS_threads) > 0
                          ? absl::GetFlag(FLAGS_threads)
                          : static_cast<int>(std::thread::hardware_concurrency());
  const std::string device = absl::GetFlag(FLAGS_device),
                    precision = absl::GetFlag(FLAGS_precision);
  if (path.empty()) {
    std::fprintf(stderr, "--backbone is required\n");
    return 2;
  }
  at::set_num_threads(threads);
  ServerOptions o;
  o.backbone = {path, device, precision, threads};
  o.engine.max_batch_size = batch;
  o.engine.max_queue_delay = absl::Milliseconds(5);
  o.engine.max_queue_size = 4 * batch;
  o.engine.threads = threads;
  o.embedder.preprocess_threads = threads;
  o.limits.max_images_per_request = batch;
  o.max_message_bytes = 256 << 20;
  o.data_dir = absl::StrCat("/tmp/tlserve-bench-data-", getpid());
  o.grpc_address = "127.0.0.1:0";
  o.metrics_address = "";
  auto server = Server::Start(o);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  auto client = Client::Connect(absl::StrCat("127.0.0.1:", (*server)->grpc_port()));
  if (!client.ok()) return 1;
  auto described = (*client)->DescribeBackbone();
  if (!described.ok()) return 1;
  const int64_t crop = described->preprocessing().crop();
  const int clients = absl::GetFlag(FLAGS_clients);

  v1::Image tensor;
  tensor.mutable_tensor()->set_layout(v1::RawTensor::FLOAT32_CHW);
  for (int64_t d : {int64_t{3}, crop, crop}) tensor.mutable_tensor()->add_shape(d);
  torch::Tensor x = torch::randn({3, crop, crop});
  tensor.mutable_tensor()->set_data(x.data_ptr(), x.numel() * sizeof(float));
  v1::Image encoded;
  if (!absl::GetFlag(FLAGS_image).empty()) {
    std::FILE* f = std::fopen(absl::GetFlag(FLAGS_image).c_str(), "rb");
    std::string bytes;
    char buf[65536];
    for (size_t n; f && (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) bytes.append(buf, n);
    if (f) std::fclose(f);
    encoded.set_encoded(bytes);
  }

  std::vector<std::function<Row()>> modes;
  modes.push_back(InProcess("in-process LibTorch forward, backbone", path, batch, batches, crop,
                            device, precision));
  modes.push_back(Served(**server, "served Embed, float32 tensors",
                         Request(**client, tensor, batch, ""), batch, batches, clients));
  if (encoded.has_encoded()) {
    modes.push_back(Served(**server, "served Embed, encoded (decode+preproc.)",
                           Request(**client, encoded, batch, ""), batch, batches, clients));
    auto exported = MakeModel(**client, encoded);
    if (!exported.ok()) {
      std::fprintf(stderr, "making the Classify model: %s\n", exported.status().ToString().c_str());
      return 1;
    }
    modes.push_back(InProcess("in-process forward, exported classifier", *exported, batch, batches,
                              crop, device, precision));
    modes.push_back(Served(**server, "served Classify, float32 tensors",
                           Request(**client, tensor, batch, "bench"), batch, batches, clients));
    modes.push_back(Served(**server, "served Classify, encoded (decode+preproc.)",
                           Request(**client, encoded, batch, "bench"), batch, batches, clients));
  }
  // Rounds alternate the modes so that drift on a shared machine hits all alike.
  std::vector<Row> rows;
  for (int round = 0; round < absl::GetFlag(FLAGS_rounds); ++round) {
    for (size_t i = 0; i < modes.size(); ++i) {
      Row r = modes[i]();
      if (round == 0) {
        rows.push_back(r);
      } else {
        rows[i].images += r.images;
        rows[i].seconds += r.seconds;
        rows[i].batches += r.batches;
      }
    }
  }

  std::printf(
      "\nThroughput: %s (%s), 3x%lldx%lld, batch %d, %d threads, %s %s, %d client threads, "
      "%d rounds x %d batches\n\n",
      path.c_str(), described->file_name().c_str(), static_cast<long long>(crop),
      static_cast<long long>(crop), batch, threads, device.c_str(), precision.c_str(), clients,
      absl::GetFlag(FLAGS_rounds), batches);
  std::printf("| %-44s | %7s | %10s | %8s | %9s | %17s |\n", "mode", "images", "mean batch",
              "seconds", "images/s", "ratio to in-proc");
  std::printf("|%s|%s|%s|%s|%s|%s|\n", std::string(46, '-').c_str(), std::string(9, '-').c_str(),
              std::string(12, '-').c_str(), std::string(10, '-').c_str(),
              std::string(11, '-').c_str(), std::string(19, '-').c_str());
  double base = 1;
  for (const Row& r : rows) {
    const double rate = r.images / r.seconds;
    if (r.baseline) base = rate;
    const double mean_batch = r.batches > 0 ? r.images / r.batches : batch;
    std::printf("| %-44s | %7lld | %10.1f | %8.2f | %9.1f | %17.3f |\n", r.mode.c_str(),
                static_cast<long long>(r.images), mean_batch, r.seconds, rate, rate / base);
  }
  // Out before anything is torn down: on the GPU machine the process crashed
  // at exit, after the server had stopped, and took the buffered table with
  // it (gpu-check, 2026-11-28).
  std::fflush(stdout);
  (*server)->Shutdown(absl::Seconds(5));
  std::filesystem::remove_all(o.data_dir);
  return 0;
}

}  // namespace
}  // namespace tlserve

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return tlserve::Main();
}
