// tlctl: the command-line client of tlserve.
//   tlctl [--server=HOST:PORT] [--token=KEY] [--tls | --tls_ca=PEM] [--json] COMMAND [ARGS]
#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/lib/client.h"
#include "client/lib/image_files.h"
#include "client/tlctl/args.h"
#include "client/tlctl/format.h"
#include "client/tlctl/model_commands.h"

namespace tlserve {
namespace {

constexpr char kUsage[] = R"(usage: tlctl [--server=HOST:PORT] [--token=KEY] [--tls | --tls_ca=PEM]
             [--tls_cert=PEM --tls_key=PEM] [--lb=round_robin] [--json] COMMAND [ARGS]

commands:
  health                         the server's health (SERVING, NOT_SERVING)
  layers                         the backbone's stages in order (its _modules)
  summary [--input 3x224x224]    a torchsummary-style table of the backbone
  embed FILE|DIR... [--layer L] [--pool avg|max] [--normalize] [--out FILE.csv|FILE.npy]
                                 one vector per image (directories: every .jpg/.png below)
  upload DIR --dataset NAME [--strict] [--unlabelled]
                                 upload an ImageFolder tree DIR/<class>/<image> (appends);
                                 --unlabelled: every image below DIR, with no label (a pool)
  datasets                       the datasets with their sizes
  dataset NAME                   one dataset's classes and counts
  delete-dataset NAME            delete a dataset and its images
  create-model NAME (--dataset D | --classes a,b,c) [--hidden 256,64 --dropout 0.2]
  models                         the models, with their served versions
  describe-model MODEL           stages (shared/private, trainable), head, versions and metrics
  delete-model MODEL
  unfreeze MODEL STAGE... | --from STAGE
                                 give the model its own trainable copies of stages
  freeze MODEL STAGE... | --from STAGE [--drop]
                                 stop training them (--drop: back to the shared stages)
  train MODEL --dataset D [--epochs N --head-lr X --lr X (stages) --optimizer lbfgs|adamw|sgd
        --batch-size N --weight-decay X --label-smoothing X --balanced --patience N
        --augment --train-batchnorm --no-head-first --no-resume --seed N
        --serve if-not-worse|always|never --target-precision P
        --sweep [--l2 X,Y,... --folds K --heads linear,H,... --layers layer3,embedding]
        --constant-lr --warmup F --layer-decay X --no-gradual] [--wait]
                                 start a job; --wait follows it (Ctrl-C: cancel or detach);
                                 --sweep: one head per L2 value (and head shape: linear, or
                                 one hidden layer of H units; and feature layer: a stage's
                                 output average-pooled) by k-fold, then a leaderboard
  jobs [--model M]               training jobs
  watch JOB                      follow a job
  cancel JOB                     cancel a job
  classify MODEL FILE|DIR... [--top-k K] [--version V]
                                 top-k labels per image
  export MODEL --out FILE.pt [--version V]
                                 download the model as one TorchScript classifier
  evaluate MODEL --dataset D [--version V | --versions 1,2,3] [--split all|validation|train]
        [--validation-fraction F] [--target-precision P]
                                 accuracy, top-5, log loss, calibration error, per-class scores
                                 and confusion matrix; several versions: a paired comparison;
                                 --target-precision: the per-class thresholds that reach it
  serve MODEL --version V        serve that version (promote or roll back)
  thresholds MODEL [--version V] (--global P | --class LABEL=P,... | --clear |
                 --target-precision P --dataset D [--split validation|all|train]
                 [--validation-fraction F])
                                 below its threshold (and at 1, always), Classify answers
                                 "unknown"; --target-precision: chosen per class on D's images
  suggest MODEL --dataset POOL [--count K] [--strategy margin|entropy] [--duplicate-cosine X]
                                 the pool's unlabelled images to label next, most uncertain first

options:
  --server=HOST:PORT   default localhost:50051 (or $TLSERVE_SERVER)
  --token=KEY          the API key, sent as "authorization: Bearer KEY" on every call;
                       default $TLSERVE_TOKEN (which keeps the key out of `ps`)
  --tls                TLS, the server's certificate checked against the system's roots
  --tls_ca=PEM         TLS, the server's certificate checked against this CA instead
  --tls_cert=PEM --tls_key=PEM
                       a client certificate and its key, for servers that require one (mTLS)
                       (any --tls_* flag turns TLS on; without them tlctl speaks plaintext)
  --lb=round_robin     spread calls over every address --server resolves to (several
                       replicas: dns:///HEADLESS-SERVICE:50051, or ipv4:ADDR:PORT,ADDR:PORT);
                       default pick_first, one connection (or $TLSERVE_LB)
  --json               machine-readable output on stdout

exit status: 0 done, 1 a failure (the server's or the command's), 2 no or an unknown command,
or a --token, --tls_* file or --lb that cannot be used
)";

int Health(Client& c, const Args& a) {
  auto h = c.Health();
  if (!h.ok()) return Fail(h.status());
  if (a.flags.count("json")) {
    std::cout << nlohmann::json{{"status", *h}}.dump() << "\n";
  } else {
    std::cout << *h << "\n";
  }
  return *h == "SERVING" ? 0 : 1;
}

int Layers(Client& c, const Args& a, bool table) {
  std::vector<int64_t> input;
  if (a.flags.count("input")) {
    for (absl::string_view part : absl::StrSplit(a.flags.at("input"), 'x')) {
      int64_t v = 0;
      if (!absl::SimpleAtoi(part, &v)) {
        return Fail(absl::InvalidArgumentError("--input must look like 3x224x224"));
      }
      input.push_back(v);
    }
  }
  auto d = c.DescribeBackbone(input);
  if (!d.ok()) return Fail(d.status());
  if (a.flags.count("json")) {
    nlohmann::json stages = nlohmann::json::array();
    for (const auto& s : d->stages()) {
      stages.push_back(
          {{"name", s.name()},
           {"type", s.type()},
           {"output_shape", std::vector<int64_t>(s.output_shape().begin(), s.output_shape().end())},
           {"params", s.params()},
           {"trainable", s.trainable()},
           {"head", s.head()}});
    }
    nlohmann::json j = {
        {"file_name", d->file_name()},
        {"sha256", d->sha256()},
        {"device", d->device()},
        {"dtype", d->dtype()},
        {"pretrained", d->pretrained()},
        {"embedding_dim", d->embedding_dim()},
        {"input_shape", std::vector<int64_t>(d->input_shape().begin(), d->input_shape().end())},
        {"total_params", d->total_params()},
        {"trainable_params", d->trainable_params()},
        {"stages", stages}};
    std::cout << j.dump() << "\n";
  } else if (table) {
    std::cout << SummaryTable(*d);
  } else {
    for (const auto& s : d->stages()) std::cout << s.name() << "\n";
  }
  return 0;
}

int Embed(Client& c, const Args& a) {
  if (a.positional.empty()) return Fail(absl::InvalidArgumentError("embed needs FILE or DIR"));
  auto files = ListImageFiles(a.positional);
  if (!files.ok()) return Fail(files.status());
  if (files->empty()) return Fail(absl::NotFoundError("no .jpg/.jpeg/.png files found"));
  v1::EmbedOptions options;
  if (a.flags.count("layer")) options.set_layer(a.flags.at("layer"));
  if (a.flags.count("pool")) {
    const std::string& p = a.flags.at("pool");
    if (p != "avg" && p != "max") return Fail(absl::InvalidArgumentError("--pool is avg or max"));
    options.set_pool(p == "max" ? v1::POOL_MAX : v1::POOL_AVG);
  }
  options.set_normalize(a.flags.count("normalize") > 0);

  std::vector<NamedVector> rows;
  int64_t dim = 0;
  int failed = 0;
  ProgressBar bar("embedding", files->size());
  absl::Status s = c.StreamEmbed(
      options, files->size(), 16, [&](size_t i) { return ReadImage((*files)[i]); },
      [&](const v1::EmbedResult& r) {
        if (r.has_error()) {
          ++failed;
          std::cerr << "tlctl: " << r.error().message() << "\n";
        } else {
          dim = r.embedding().values_size();
          rows.push_back(
              {r.name(), {r.embedding().values().begin(), r.embedding().values().end()}});
        }
        bar.Update(rows.size() + failed);
      });
  bar.Finish();
  if (!s.ok()) return Fail(s);
  if (a.flags.count("out")) {
    if (auto w = WriteEmbeddings(a.flags.at("out"), rows); !w.ok()) return Fail(w);
  }
  if (a.flags.count("json")) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& r : rows) list.push_back({{"name", r.name}, {"vector", r.values}});
    std::cout << nlohmann::json{{"dim", dim}, {"embeddings", list}}.dump() << "\n";
  } else if (!a.flags.count("out")) {
    for (const auto& r : rows) {
      std::cout << r.name << ": dim " << r.values.size() << " [";
      for (size_t i = 0; i < std::min<size_t>(4, r.values.size()); ++i) {
        std::cout << (i ? ", " : "") << r.values[i];
      }
      std::cout << (r.values.size() > 4 ? ", ...]\n" : "]\n");
    }
  } else {
    std::cerr << "wrote " << rows.size() << " vectors of dim " << dim << " to " << a.flags.at("out")
              << "\n";
  }
  return failed > 0 ? 1 : 0;
}

nlohmann::json DatasetJson(const v1::Dataset& d) {
  nlohmann::json classes = nlohmann::json::object();
  for (const auto& c : d.classes()) classes[c.label()] = c.count();
  nlohmann::json out = {{"name", d.name()},
                        {"images", d.images()},
                        {"bytes", d.bytes()},
                        {"created_unix", d.created_unix()},
                        {"classes", classes}};
  if (const std::string t = TenantOf(d); !t.empty()) out["tenant"] = t;
  return out;
}

void PrintDataset(const v1::Dataset& d) {
  std::cout << d.name() << ": " << d.images() << " images, " << d.classes_size() << " classes, "
            << WithCommas(d.bytes()) << " bytes\n";
  for (const auto& c : d.classes()) std::cout << "  " << c.label() << ": " << c.count() << "\n";
}

// DIR/<class>/<image>: the label is the first directory under DIR.
int Upload(Client& c, const Args& a) {
  if (a.positional.size() != 1 || !a.flags.count("dataset")) {
    return Fail(absl::InvalidArgumentError(
        "usage: tlctl upload DIR --dataset NAME [--strict] [--unlabelled]"));
  }
  const std::string root = a.positional[0];
  auto files = ListImageFiles({root});
  if (!files.ok()) return Fail(files.status());
  std::vector<std::pair<std::string, std::string>> examples;  // path, label
  for (const std::string& f : *files) {
    const std::string rel = f.substr(root.size() + (root.back() == '/' ? 0 : 1));
    if (a.Has("unlabelled")) {  // a pool: no labels
      examples.emplace_back(f, "");
      continue;
    }
    const auto slash = rel.find('/');
    if (slash == std::string::npos) {
      std::cerr << "tlctl: skipping " << f << ": not inside a class directory\n";
      continue;
    }
    // Protobuf strings are UTF-8: a class directory named in another
    // encoding (Latin-1, say) cannot be a label, and the server would refuse
    // the whole upload. Say so before sending anything.
    const std::string label = rel.substr(0, slash);
    if (!IsUtf8(label)) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("class directory \"", ToUtf8(label), "\" (", f,
                       ") is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)")));
    }
    examples.emplace_back(f, label);
  }
  if (examples.empty()) {
    return Fail(absl::NotFoundError(absl::StrCat(root, " has no DIR/<class>/<image> files")));
  }
  ProgressBar bar("uploading", examples.size());
  auto r = c.UploadDataset(
      a.flags.at("dataset"), a.flags.count("strict") > 0, examples.size(), 32,
      [&](size_t i) -> absl::StatusOr<v1::Example> {
        auto bytes = ReadFileBytes(examples[i].first);
        if (!bytes.ok()) return bytes.status();
        v1::Example e;
        e.set_name(ToUtf8(examples[i].first));  // a name is only for reports
        e.set_label(examples[i].second);
        e.set_encoded(std::move(*bytes));
        return e;
      },
      [&](size_t n) { bar.Update(n); });
  bar.Finish();
  if (!r.ok()) return Fail(r.status());
  for (const auto& rej : r->rejected()) {
    std::cerr << "tlctl: rejected " << rej.name() << ": " << rej.reason() << "\n";
  }
  if (a.flags.count("json")) {
    nlohmann::json rejected = nlohmann::json::array();
    for (const auto& rej : r->rejected()) {
      rejected.push_back({{"index", rej.index()}, {"name", rej.name()}, {"reason", rej.reason()}});
    }
    nlohmann::json j = {{"dataset", DatasetJson(r->dataset())},
                        {"accepted", r->accepted()},
                        {"rejected", rejected},
                        {"rejected_total", r->rejected_total()}};
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "uploaded " << r->accepted() << " images, " << r->rejected_total()
              << " rejected\n";
    if (r->rejected_total() > r->rejected_size()) {
      std::cerr << "tlctl: (the first " << r->rejected_size() << " rejects are listed)\n";
    }
    PrintDataset(r->dataset());
  }
  return r->rejected_total() > 0 ? 1 : 0;
}

int Datasets(Client& c, const Args& a) {
  auto list = c.ListDatasets();
  if (!list.ok()) return Fail(list.status());
  if (a.flags.count("json")) {
    nlohmann::json all = nlohmann::json::array();
    for (const auto& d : list->datasets()) all.push_back(DatasetJson(d));
    std::cout << nlohmann::json{{"datasets", all}}.dump() << "\n";
    return 0;
  }
  const bool several = SeveralTenants(list->datasets());
  for (const auto& d : list->datasets()) {
    std::cout << TenantCell(d, several) << d.name() << "\t" << d.images() << " images\t"
              << d.classes_size() << " classes\n";
  }
  return 0;
}

int Dataset(Client& c, const Args& a) {
  if (a.positional.size() != 1)
    return Fail(absl::InvalidArgumentError("usage: tlctl dataset NAME"));
  auto d = c.GetDataset(a.positional[0]);
  if (!d.ok()) return Fail(d.status());
  if (a.flags.count("json")) {
    std::cout << DatasetJson(*d).dump() << "\n";
  } else {
    PrintDataset(*d);
  }
  return 0;
}

int DeleteDataset(Client& c, const Args& a) {
  if (a.positional.size() != 1) {
    return Fail(absl::InvalidArgumentError("usage: tlctl delete-dataset NAME"));
  }
  if (auto s = c.DeleteDataset(a.positional[0]); !s.ok()) return Fail(s);
  if (!a.flags.count("json")) std::cout << "deleted dataset " << a.positional[0] << "\n";
  return 0;
}

int Main(int argc, char** argv) {
  auto args = Parse(argc, argv);
  if (!args.ok()) return Fail(args.status());
  if (args->command.empty() || args->command == "help" || args->flags.count("help")) {
    std::cout << kUsage;
    return args->command.empty() && !args->flags.count("help") ? 2 : 0;
  }
  std::string server = "localhost:50051";
  if (const char* env = std::getenv("TLSERVE_SERVER")) server = env;
  if (args->flags.count("server")) server = args->flags.at("server");
  const std::string& cmd = args->command;
  std::map<std::string, Command> commands = {
      {"health", Health},
      {"layers", [](Client& c, const Args& a) { return Layers(c, a, false); }},
      {"summary", [](Client& c, const Args& a) { return Layers(c, a, true); }},
      {"embed", Embed},
      {"upload", Upload},
      {"datasets", Datasets},
      {"dataset", Dataset},
      {"delete-dataset", DeleteDataset},
  };
  AddModelCommands(commands);
  const auto command = commands.find(cmd);
  if (command == commands.end()) {
    std::cerr << "tlctl: unknown command \"" << cmd << "\"\n" << kUsage;
    return 2;
  }
  std::string token;
  if (const char* env = std::getenv("TLSERVE_TOKEN")) token = env;
  if (args->Has("token")) token = args->Get("token");
  // tlctl's own flags use hyphens, the server's underscores: both are taken.
  const auto flag = [&](const std::string& name) {
    std::string hyphens = name;
    std::replace(hyphens.begin(), hyphens.end(), '_', '-');
    return args->Get(name, args->Get(hyphens));
  };
  auto security = ChannelSecurity::FromFiles(token, args->Has("tls"), flag("tls_ca"),
                                             flag("tls_cert"), flag("tls_key"));
  if (!security.ok()) {
    Fail(security.status());
    return 2;
  }
  std::string lb;
  if (const char* env = std::getenv("TLSERVE_LB")) lb = env;
  if (args->Has("lb")) lb = args->Get("lb");
  auto client = Client::Connect(server, *security, absl::Seconds(10), lb);
  if (!client.ok() && client.status().code() == absl::StatusCode::kInvalidArgument) {
    Fail(client.status());
    return 2;
  }
  if (!client.ok()) return Fail(client.status());
  return command->second(**client, *args);
}

}  // namespace
}  // namespace tlserve

int main(int argc, char** argv) { return tlserve::Main(argc, argv); }
