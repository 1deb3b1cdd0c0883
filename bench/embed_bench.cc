// Served Embed throughput against an in-process LibTorch forward of the same
// TorchScript module, with the same threads and batch size, measured side by
// side in one run. Prints a table of images/s and the ratio to in-process.
//
//   embed_bench --backbone=resnet50.pt [--batch=32] [--batches=8] [--threads=N]
//               [--device=cpu|cuda] [--precision=fp32|bf16|fp16] [--jpeg=FILE]
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <cstdio>
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
ABSL_FLAG(std::string, jpeg, "", "a JPEG to send in the encoded-image mode (skipped if empty)");

namespace tlserve {
namespace {

struct Row {
  std::string mode;
  int64_t images;
  double seconds;
  double batches = 0;  // forwards run by the server (served modes)
};

double BatchCount(Metrics& m) {
  return static_cast<double>(m.batch_size().Collect().histogram.sample_count);
}

void Sync(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// Loads the module once; each call times `batches` forwards.
std::function<Row()> InProcess(const std::string& path, int batch, int batches,
                               const std::string& device, const std::string& precision) {
  torch::Device dev = device == "cpu" ? torch::Device(torch::kCPU) : torch::Device(device);
  const auto dtype = precision == "bf16"   ? torch::kBFloat16
                     : precision == "fp16" ? torch::kHalf
                                           : torch::kFloat;
  auto m = std::make_shared<torch::jit::Module>(torch::jit::load(path, dev));
  m->eval();
  m->to(dtype);
  c10::InferenceMode guard;
  torch::Tensor x = torch::randn({batch, 3, 224, 224}).to(dev, dtype);
  if (dtype != torch::kFloat) {
    x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    for (const auto& p : m->parameters()) {
      if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
    }
  }
  // TorchScript's profiling executor optimises on the second run: warm up past it.
  for (int i = 0; i < 3; ++i) m->forward({x});
  Sync(dev);
  return [m, x, dev, batch, batches] {
    c10::InferenceMode guard;
    const absl::Time start = absl::Now();
    for (int i = 0; i < batches; ++i) m->forward({x});
    Sync(dev);
    return Row{"in-process LibTorch forward", int64_t{batch} * batches,
               absl::ToDoubleSeconds(absl::Now() - start)};
  };
}

// Each call times about `batches` batches' worth of Embed calls from `clients` threads.
std::function<Row()> Served(Server& server, Client& client, const std::string& mode,
                            const v1::Image& image, int batch, int batches, int clients) {
  // Whole batches per request, so that the server's batches are the
  // in-process batch size; several clients keep the batcher fed.
  const int per_request = batch;
  const int requests = std::max(1, batches / clients);
  auto req = std::make_shared<v1::EmbedRequest>();
  for (int i = 0; i < per_request; ++i) *req->add_images() = image;
  auto run = [&client, req, clients](int n) {
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&] {
        for (int r = 0; r < n; ++r) {
          auto resp = client.Embed(*req);
          if (!resp.ok()) {
            std::fprintf(stderr, "Embed failed: %s\n", resp.status().ToString().c_str());
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

int Main() {
  const std::string path = absl::GetFlag(FLAGS_backbone);
  const int batch = absl::GetFlag(FLAGS_batch), batches = absl::GetFlag(FLAGS_batches);
  const int threads = absl::GetFlag(FLAGS_threads) > 0
                          ? absl::GetFlag(FLAGS_threads)
                          : static_cast<int>(std::thread::hardware_concurrency());
  if (path.empty()) {
    std::fprintf(stderr, "--backbone is required\n");
    return 2;
  }
  at::set_num_threads(threads);
  std::vector<std::function<Row()>> modes;
  modes.push_back(
      InProcess(path, batch, batches, absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_precision)));

  ServerOptions o;
  o.backbone = {path, absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_precision), threads};
  o.embedder.batching.max_batch_size = batch;
  o.embedder.batching.max_queue_delay = absl::Milliseconds(5);
  o.embedder.batching.max_queue_size = 4 * batch;
  o.embedder.preprocess_threads = threads;
  o.limits.max_images_per_request = batch;
  o.max_message_bytes = 256 << 20;
  o.data_dir = "/tmp/tlserve-bench-data";
  o.grpc_address = "127.0.0.1:0";
  o.metrics_address = "";
  auto server = Server::Start(o);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  auto client = Client::Connect(absl::StrCat("127.0.0.1:", (*server)->grpc_port()));
  if (!client.ok()) return 1;
  const int clients = absl::GetFlag(FLAGS_clients);

  v1::Image tensor;
  tensor.mutable_tensor()->set_layout(v1::RawTensor::FLOAT32_CHW);
  for (int64_t d : {3, 224, 224}) tensor.mutable_tensor()->add_shape(d);
  torch::Tensor x = torch::randn({3, 224, 224});
  tensor.mutable_tensor()->set_data(x.data_ptr(), x.numel() * sizeof(float));
  modes.push_back(
      Served(**server, **client, "served Embed, float32 tensors", tensor, batch, batches, clients));
  if (!absl::GetFlag(FLAGS_jpeg).empty()) {
    std::FILE* f = std::fopen(absl::GetFlag(FLAGS_jpeg).c_str(), "rb");
    std::string bytes;
    char buf[65536];
    for (size_t n; f && (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) bytes.append(buf, n);
    if (f) std::fclose(f);
    v1::Image jpeg;
    jpeg.set_encoded(bytes);
    modes.push_back(Served(**server, **client, "served Embed, JPEG (decode+preprocess)", jpeg,
                           batch, batches, clients));
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
      "\nEmbed throughput: %s, 3x224x224, batch %d, %d threads, %s %s, %d client threads, "
      "%d rounds x %d batches\n\n",
      path.c_str(), batch, threads, absl::GetFlag(FLAGS_device).c_str(),
      absl::GetFlag(FLAGS_precision).c_str(), clients, absl::GetFlag(FLAGS_rounds), batches);
  std::printf("| %-40s | %7s | %10s | %8s | %9s | %17s |\n", "mode", "images", "mean batch",
              "seconds", "images/s", "ratio to in-proc");
  std::printf("|%s|%s|%s|%s|%s|%s|\n", std::string(42, '-').c_str(), std::string(9, '-').c_str(),
              std::string(12, '-').c_str(), std::string(10, '-').c_str(),
              std::string(11, '-').c_str(), std::string(19, '-').c_str());
  const double base = rows[0].images / rows[0].seconds;
  for (const Row& r : rows) {
    const double rate = r.images / r.seconds;
    const double mean_batch = r.batches > 0 ? r.images / r.batches : batch;
    std::printf("| %-40s | %7lld | %10.1f | %8.2f | %9.1f | %17.3f |\n", r.mode.c_str(),
                static_cast<long long>(r.images), mean_batch, r.seconds, rate, rate / base);
  }
  return 0;
}

}  // namespace
}  // namespace tlserve

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return tlserve::Main();
}
