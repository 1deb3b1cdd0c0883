// Starts a real server on loopback ports and talks to it with the client
// library: parity with PyTorch, concurrency and batching, bad input, metrics.
#include "server/api/server.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/lib/client.h"
#include "tests/integration/http_get.h"
#include "tests/integration/loopback_options.h"
#include "tests/integration/test_env.h"
#include "tests/test_util.h"

namespace tlserve {
namespace {

using ::tlserve::testing::Cosine;
using ::tlserve::testing::Fixture;
using ::tlserve::testing::HttpGet;
using ::tlserve::testing::MaxAbs;
using ::tlserve::testing::MaxAbsDiff;
using ::tlserve::testing::ReadBytes;
using ::tlserve::testing::ReadF32;

const std::vector<std::string> kImages = {"rgb_png.png",     "gray_png.png", "rgba_png.png",
                                          "palette_png.png", "rgb_jpg.jpg",  "gray_jpg.jpg",
                                          "small_png.png"};

std::string TempDir() {
  char tmpl[] = "/tmp/tlserve-it-XXXXXX";
  return ::mkdtemp(tmpl);
}

// The device the test servers report: TLSERVE_TEST_DEVICE's, with CUDA's
// index ("cuda" serves on cuda:0).
std::string ServedDevice() {
  const std::string d = testing::TestDevice();
  return d == "cuda" ? "cuda:0" : d;
}

ServerOptions TestOptions(const std::string& backbone) {
  ServerOptions o = testing::LoopbackOptions(backbone, TempDir());
  o.engine.max_batch_size = 16;
  o.engine.max_queue_delay = absl::Milliseconds(20);
  o.limits.max_images_per_request = 40;
  o.max_message_bytes = 4 << 20;
  o.embedder.max_request_pixels = 16'000'000;
  return o;
}

v1::Image EncodedImage(const std::string& file, const std::string& name = "") {
  v1::Image img;
  img.set_name(name.empty() ? file : name);
  img.set_encoded(ReadBytes(Fixture(file)));
  return img;
}

std::vector<float> Values(const v1::Embedding& e) { return {e.values().begin(), e.values().end()}; }

// One ResNet-50 server for the whole suite.
class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto s = Server::Start(TestOptions("r50.pt"));
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = s->release();
    auto c = Client::Connect(absl::StrCat("127.0.0.1:", server_->grpc_port()));
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = c->release();
  }
  static void TearDownTestSuite() {
    delete client_;
    delete server_;
  }
  absl::StatusOr<v1::EmbedResponse> EmbedFiles(const std::vector<std::string>& files) {
    v1::EmbedRequest req;
    for (const auto& f : files) *req.add_images() = EncodedImage(f);
    return client_->Embed(req);
  }
  static double MetricValue(const std::string& text, const std::string& series) {
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      if (absl::StartsWith(line, series + " ")) {
        double v = 0;
        if (absl::SimpleAtod(line.substr(series.size() + 1), &v)) return v;
      }
    }
    return -1;
  }

  static Server* server_;
  static Client* client_;
};
Server* ServerTest::server_ = nullptr;
Client* ServerTest::client_ = nullptr;

TEST_F(ServerTest, HealthIsServing) { EXPECT_EQ(*client_->Health(), "SERVING"); }

TEST_F(ServerTest, DescribeBackboneListsStagesAndTotals) {
  auto d = client_->DescribeBackbone({3, 1024, 1024});
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->stages_size(), 10);
  EXPECT_EQ(d->total_params(), 25'557'032);
  EXPECT_EQ(d->stages(9).params(), 2'049'000);
  EXPECT_TRUE(d->stages(9).head());
  EXPECT_EQ(d->stages(0).output_shape(1), 512);
  EXPECT_EQ(d->embedding_dim(), 2048);
  EXPECT_EQ(d->preprocessing().crop(), 224);
  EXPECT_EQ(d->device(), ServedDevice());
  EXPECT_FALSE(d->pretrained());
  EXPECT_EQ(client_->DescribeBackbone({3, 224}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ServerTest, EmbedOfImagesMatchesTorchvisionPipelines) {
  auto r = EmbedFiles(kImages);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->embeddings_size(), static_cast<int>(kImages.size()));
  EXPECT_EQ(r->dim(), 2048);
  double worst_cosine = 1, worst_rel_diff = 0;
  std::string worst_image;
  for (size_t i = 0; i < kImages.size(); ++i) {
    const std::string stem = kImages[i].substr(0, kImages[i].find('.'));
    const auto got = Values(r->embeddings(static_cast<int>(i)));
    // torchvision on a uint8 tensor (antialias=True): the same algorithm.
    const auto tensor_ref = ReadF32(Fixture("img_" + stem + ".tensor.r50.f32"));
    EXPECT_LE(MaxAbsDiff(got, tensor_ref), 1e-4 * MaxAbs(tensor_ref)) << stem;
    worst_rel_diff = std::max(worst_rel_diff, MaxAbsDiff(got, tensor_ref) / MaxAbs(tensor_ref));
    // torchvision on a PIL image: PIL's own resampler, so close, not equal.
    const double c = Cosine(got, ReadF32(Fixture("img_" + stem + ".pil.r50.f32")));
    if (c < worst_cosine) {
      worst_cosine = c;
      worst_image = stem;
    }
  }
  EXPECT_GE(worst_cosine, 0.999) << "worst cosine vs the PIL pipeline: " << worst_cosine << " ("
                                 << worst_image << ")";
  std::printf(
      "measured: worst cosine vs torchvision PIL pipeline %.6f (%s); worst max|diff|/max|ref| "
      "vs torchvision tensor pipeline %.2e\n",
      worst_cosine, worst_image.c_str(), worst_rel_diff);
  RecordProperty("worst_cosine_vs_pil", std::to_string(worst_cosine));
}

TEST_F(ServerTest, EmbedOfFloatTensorsEqualsPyTorchForward) {
  const auto in = ReadF32(Fixture("float_r50.in.f32"));
  const auto want = ReadF32(Fixture("float_r50.out.f32"));
  v1::EmbedRequest req;
  const size_t per = 3 * 224 * 224;
  for (int i = 0; i < 3; ++i) {
    v1::RawTensor* t = req.add_images()->mutable_tensor();
    t->set_layout(v1::RawTensor::FLOAT32_CHW);
    for (int64_t d : {3, 224, 224}) t->add_shape(d);
    t->set_data(reinterpret_cast<const char*>(in.data() + i * per), per * sizeof(float));
  }
  auto r = client_->Embed(req);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<float> got;
  for (const auto& e : r->embeddings()) got.insert(got.end(), e.values().begin(), e.values().end());
  const double diff = MaxAbsDiff(got, want), scale = MaxAbs(want);
  EXPECT_LE(diff, 1e-4 * scale) << "max|diff| " << diff << ", max|ref| " << scale;
  std::printf("measured: float input max|diff| %.3g, max|ref| %.3g\n", diff, scale);
}

TEST_F(ServerTest, RawUint8TensorEmbedsLikeTheEncodedImage) {
  const std::string pixels = ReadBytes(Fixture("img_rgb_png.rgb.u8"));
  v1::EmbedRequest req;
  v1::RawTensor* t = req.add_images()->mutable_tensor();
  t->set_layout(v1::RawTensor::UINT8_HWC);
  for (int64_t d : {300, 400, 3}) t->add_shape(d);
  t->set_data(pixels);
  *req.add_images() = EncodedImage("rgb_png.png");
  auto r = client_->Embed(req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(Values(r->embeddings(0)), Values(r->embeddings(1)));
}

TEST_F(ServerTest, LayerPoolAndNormalizeOptions) {
  v1::EmbedRequest req;
  *req.add_images() = EncodedImage("rgb_jpg.jpg");
  req.mutable_options()->set_layer("layer2");
  req.mutable_options()->set_pool(v1::POOL_MAX);
  req.mutable_options()->set_normalize(true);
  auto r = client_->Embed(req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->dim(), 512);
  double norm = 0;
  for (float v : r->embeddings(0).values()) norm += double(v) * v;
  EXPECT_NEAR(norm, 1.0, 1e-5);
}

TEST_F(ServerTest, ConcurrentClientsGetExactlyTheLoneVectorsInBatches) {
  const std::vector<std::string> files = {"rgb_png.png", "rgb_jpg.jpg", "gray_png.png",
                                          "palette_png.png"};
  std::vector<std::vector<float>> lone;
  for (const auto& f : files) {
    auto r = EmbedFiles({f});
    ASSERT_TRUE(r.ok()) << r.status();
    lone.push_back(Values(r->embeddings(0)));
  }
  const std::string before = HttpGet(server_->metrics_port(), "/metrics");
  const double batches_before = MetricValue(before, "tlserve_batch_size_count");
  const double singles_before = MetricValue(before, "tlserve_batch_size_bucket{le=\"1\"}");
  constexpr int kClients = 32;
  std::vector<std::vector<float>> got(kClients);
  std::vector<absl::Status> status(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      auto c = Client::Connect(absl::StrCat("127.0.0.1:", server_->grpc_port()));
      if (!c.ok()) {
        status[i] = c.status();
        return;
      }
      v1::EmbedRequest req;
      *req.add_images() = EncodedImage(files[i % files.size()]);
      auto r = (*c)->Embed(req);
      status[i] = r.status();
      if (r.ok()) got[i] = Values(r->embeddings(0));
    });
  }
  for (auto& t : threads) t.join();
  double worst = 0;
  for (int i = 0; i < kClients; ++i) {
    ASSERT_TRUE(status[i].ok()) << status[i];
    worst = std::max(worst, MaxAbsDiff(got[i], lone[i % files.size()]));
  }
  // Bit-identical on the CPU; on a GPU, cuDNN picks kernels by batch size.
  if (testing::TestDevice() == "cpu") {
    EXPECT_EQ(worst, 0.0) << "a batched vector differs from the lone one by " << worst;
  } else {
    EXPECT_LE(worst, 1e-4 * MaxAbs(lone[0])) << "batched vs lone on " << testing::TestDevice();
  }
  const std::string after = HttpGet(server_->metrics_port(), "/metrics");
  const double batches = MetricValue(after, "tlserve_batch_size_count") - batches_before;
  const double multi =
      batches - (MetricValue(after, "tlserve_batch_size_bucket{le=\"1\"}") - singles_before);
  EXPECT_GT(multi, 0) << "no batch held more than one image";
  std::printf("measured: %d concurrent images ran in %.0f batches, %.0f of them with > 1 image\n",
              kClients, batches, multi);
}

struct BadInput {
  std::string label;
  v1::Image image;
  std::string message_part;
};

TEST_F(ServerTest, BadImagesAreInvalidArgumentsNamingIndexAndName) {
  std::vector<BadInput> cases;
  for (auto [file, part] : std::vector<std::pair<std::string, std::string>>{
           {"bad_truncated.jpg", "truncated JPEG"},
           {"bad_crc.png", "CRC"},
           {"bad_empty.png", "empty"},
           {"bad_format.gif", "unsupported image format"},
           {"bad_bomb.png", "over the limit"}}) {
    cases.push_back({file, EncodedImage(file, "client-" + file), part});
  }
  v1::Image short_tensor;
  short_tensor.set_name("client-short-tensor");
  short_tensor.mutable_tensor()->set_layout(v1::RawTensor::UINT8_HWC);
  for (int64_t d : {10, 10, 3}) short_tensor.mutable_tensor()->add_shape(d);
  short_tensor.mutable_tensor()->set_data(std::string(299, '\0'));
  cases.push_back({"tensor bytes", short_tensor, "needs 300"});
  v1::Image no_data;
  no_data.set_name("client-no-data");
  cases.push_back({"no data", no_data, "has no data"});

  for (const auto& c : cases) {
    v1::EmbedRequest req;
    *req.add_images() = EncodedImage("rgb_png.png");
    *req.add_images() = c.image;
    auto r = client_->Embed(req);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument)
        << c.label << ": " << r.status();
    const auto message = r.status().message();
    EXPECT_NE(message.find("images[1]"), absl::string_view::npos) << c.label << ": " << message;
    EXPECT_NE(message.find(c.image.name()), absl::string_view::npos) << c.label << ": " << message;
    EXPECT_NE(message.find(c.message_part), absl::string_view::npos) << c.label << ": " << message;
    // The server keeps serving after every one.
    ASSERT_TRUE(EmbedFiles({"gray_png.png"}).ok()) << "after " << c.label;
  }
}

TEST_F(ServerTest, BadRequestsGetCanonicalCodes) {
  auto empty = client_->Embed(v1::EmbedRequest());
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.status().message().find("no images"), absl::string_view::npos);

  v1::EmbedRequest many;
  for (int i = 0; i < 41; ++i) *many.add_images() = EncodedImage("small_png.png");
  auto too_many = client_->Embed(many);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_many.status().message().find("--max_images_per_request"), absl::string_view::npos);

  v1::EmbedRequest layer;
  *layer.add_images() = EncodedImage("small_png.png");
  layer.mutable_options()->set_layer("layer9");
  auto unknown = client_->Embed(layer);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("options.layer"), absl::string_view::npos);

  v1::EmbedRequest huge;
  v1::Image* img = huge.add_images();
  img->set_name("huge");
  img->set_encoded(std::string(5 << 20, 'x'));  // over max_message_bytes (4 MiB)
  auto big = client_->Embed(huge);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
  ASSERT_TRUE(EmbedFiles({"gray_png.png"}).ok());
}

// Found by UBSan (fuzz/crashes/embed_tensor_shape_overflow): a raw tensor
// whose H*W overflows int64 passed the pixel check with empty data.
TEST_F(ServerTest, RawTensorShapesThatOverflowAreInvalidArguments) {
  for (auto layout : {v1::RawTensor::UINT8_HWC, v1::RawTensor::FLOAT32_CHW}) {
    v1::EmbedRequest req;
    v1::Image* img = req.add_images();
    img->set_name("overflow");
    img->mutable_tensor()->set_layout(layout);
    const int64_t big = int64_t{1} << 32;
    for (int64_t d : layout == v1::RawTensor::UINT8_HWC ? std::vector<int64_t>{big, big, 3}
                                                        : std::vector<int64_t>{3, big, big}) {
      img->mutable_tensor()->add_shape(d);
    }
    auto r = client_->Embed(req);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find("--max_image_pixels"), absl::string_view::npos)
        << r.status();
    EXPECT_LT(r.status().message().size(), 300u) << "a backtrace came back: " << r.status();
  }
  ASSERT_TRUE(EmbedFiles({"gray_png.png"}).ok());
}

// Finding 7: one request of 256 images declaring 6000x6000 pixels each kept
// the preprocessing pool busy for everyone. A request's images are limited
// together (--max_request_pixels), from their headers, before any decoding.
TEST_F(ServerTest, RequestsOverThePixelBudgetAreRefusedBeforeDecoding) {
  // 20 PNGs of 1000x1000 = 20 M pixels; the test server allows 16 M a request.
  // The signature and IHDR chunk of a PNG, its width and height (big-endian
  // at 16 and 20) patched to 1000x1000: only headers are read before the
  // request is refused, so no pixel data is needed.
  std::string png = ReadBytes(Fixture("rgb_png.png")).substr(0, 33);
  for (int at : {16, 20}) {
    png[at] = 0;
    png[at + 1] = 0;
    png[at + 2] = static_cast<char>(1000 >> 8);
    png[at + 3] = static_cast<char>(1000 & 0xff);
  }
  v1::EmbedRequest req;
  for (int i = 0; i < 20; ++i) {
    v1::Image* img = req.add_images();
    img->set_encoded(png);
  }
  auto r = client_->Embed(req);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(r.status().message().find("--max_request_pixels"), absl::string_view::npos)
      << r.status();
  ASSERT_TRUE(EmbedFiles({"gray_png.png"}).ok());
}

TEST_F(ServerTest, StreamEmbedReportsBadImagesAndEmbedsTheRest) {
  const std::vector<std::string> files = {"rgb_png.png", "bad_crc.png", "gray_jpg.jpg",
                                          "bad_empty.png", "small_png.png"};
  std::vector<v1::EmbedResult> results;
  absl::Status s = client_->StreamEmbed(
      v1::EmbedOptions(), files.size(), 2,
      [&](size_t i) -> absl::StatusOr<v1::Image> { return EncodedImage(files[i]); },
      [&](const v1::EmbedResult& r) { results.push_back(r); });
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(results.size(), files.size());
  for (size_t i = 0; i < files.size(); ++i) {
    EXPECT_EQ(results[i].index(), static_cast<int64_t>(i));
    EXPECT_EQ(results[i].name(), files[i]);
    const bool bad = files[i].rfind("bad_", 0) == 0;
    EXPECT_EQ(results[i].has_error(), bad) << files[i];
    if (bad) {
      EXPECT_EQ(results[i].error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
      EXPECT_NE(results[i].error().message().find(absl::StrCat("images[", i, "]")),
                std::string::npos);
    }
  }
  auto lone = EmbedFiles({"gray_jpg.jpg"});
  ASSERT_TRUE(lone.ok());
  if (testing::TestDevice() == "cpu") {
    EXPECT_EQ(Values(results[2].embedding()), Values(lone->embeddings(0)));
  } else {  // cuDNN picks kernels by batch size
    const auto want = Values(lone->embeddings(0));
    EXPECT_LE(MaxAbsDiff(Values(results[2].embedding()), want), 1e-4 * MaxAbs(want));
  }
}

TEST_F(ServerTest, StreamEmbedWithUnknownLayerEndsTheStream) {
  v1::EmbedOptions options;
  options.set_layer("nope");
  absl::Status s = client_->StreamEmbed(
      options, 1, 1,
      [&](size_t) -> absl::StatusOr<v1::Image> { return EncodedImage("rgb_png.png"); },
      [](const v1::EmbedResult&) {});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST_F(ServerTest, ManyImagesStreamInOrder) {
  constexpr size_t kCount = 24;  // six windows of 4: enough to reorder, a ResNet-50 forward each
  size_t seen = 0;
  bool in_order = true;
  absl::Status s = client_->StreamEmbed(
      v1::EmbedOptions(), kCount, 4,
      [&](size_t) -> absl::StatusOr<v1::Image> { return EncodedImage("small_png.png"); },
      [&](const v1::EmbedResult& r) {
        in_order = in_order && r.index() == static_cast<int64_t>(seen);
        ++seen;
      });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(seen, kCount);
  EXPECT_TRUE(in_order);
}

// Finding 9: a client sending one byte every 3 s made every scrape time out
// (one thread served one connection at a time, 5 s per read); so would a
// dozen connections that send nothing, if the connection limit kept them.
TEST_F(ServerTest, ClientsThatTrickleBytesDoNotBlockTheMetricsScrape) {
  // More than the exposer's connection limit (8): the oldest that have not
  // sent their request make room for the scraper.
  std::vector<int> slow;
  for (int i = 0; i < 12; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(server_->metrics_port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ASSERT_EQ(::write(fd, "G", 1), 1);  // and never the rest
    slow.push_back(fd);
  }
  const std::string text = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_NE(text.find("tlserve_backbone_info"), std::string::npos);
  // The trickling connections are closed by the server after its deadline.
  for (int fd : slow) {
    char c;
    timeval timeout{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    EXPECT_EQ(::read(fd, &c, 1), 0) << "the server kept a trickling connection open";
    ::close(fd);
  }
}

TEST_F(ServerTest, MetricsAreExportedAndPassPromtool) {
  ASSERT_TRUE(EmbedFiles({"rgb_png.png"}).ok());
  ASSERT_FALSE(EmbedFiles({"bad_empty.png"}).ok());
  const std::string text = HttpGet(server_->metrics_port(), "/metrics");
  const std::string device = ServedDevice();
  const std::string info = absl::StrCat("tlserve_backbone_info{device=\"", device,
                                        "\",dtype=\"float32\",name=\"resnet50\",pretrained="
                                        "\"false\"} 1");
  const std::string memory =
      absl::StrCat("tlserve_device_memory_bytes{device=\"", device, "\",kind=\"",
                   device == "cpu" ? "resident" : "allocated", "\"}");
  for (const std::string& name :
       {std::string("tlserve_requests_total{code=\"OK\",method=\"Embed\"}"),
        std::string("tlserve_request_duration_seconds"),
        std::string("tlserve_images_total{method=\"Embed\"}"),
        std::string("tlserve_batch_size_bucket"),
        std::string("tlserve_queue_duration_seconds_bucket"), std::string("tlserve_queue_depth"),
        info, memory, std::string("tlserve_requests_total{code=\"INVALID_ARGUMENT\"")}) {
    EXPECT_NE(text.find(name), std::string::npos) << name;
  }
  if (std::system("command -v promtool > /dev/null") != 0) {
    GTEST_SKIP() << "no promtool on this machine (Debian: prometheus)";
  }
  const std::string path = TempDir() + "/metrics.txt";
  std::ofstream(path) << text;
  const int rc = std::system(("promtool check metrics < " + path).c_str());
  EXPECT_EQ(rc, 0) << "promtool rejected the metrics in " << path;
}

TEST(ServerQueueTest, FullQueueIsResourceExhausted) {
  ServerOptions o = TestOptions("r18small.pt");
  o.engine.max_batch_size = 1;
  o.engine.max_queue_size = 2;
  auto s = Server::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  auto c = Client::Connect(absl::StrCat("127.0.0.1:", (*s)->grpc_port()));
  ASSERT_TRUE(c.ok());
  v1::EmbedRequest req;
  for (int i = 0; i < 3; ++i) *req.add_images() = EncodedImage("small_png.png");
  auto r = (*c)->Embed(req);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_NE(r.status().message().find("--max_queue_size"), absl::string_view::npos);
  req.mutable_images()->RemoveLast();
  EXPECT_TRUE((*c)->Embed(req).ok());
}

}  // namespace
}  // namespace tlserve
