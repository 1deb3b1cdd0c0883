#include "server/core/training/stacked_heads.h"

#include <ATen/ops/mkldnn_linear.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/torch.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/core/head.h"

namespace tlserve {
namespace {

// A left operand of the objective's matrix products, kept in oneDNN's layout
// too where LibTorch has it: oneDNN picks its kernels by the CPU's features,
// while the OpenBLAS of Debian's LibTorch fell back to its slowest generic
// kernels on this machine's (too new) CPU, 4× slower (29 vs 121 GFLOPS).
struct Operand {
  at::Tensor dense, mkldnn;
  Operand() = default;
  explicit Operand(const at::Tensor& x) : dense(x.contiguous()) {
    if (at::hasMKLDNN() && dense.defined()) mkldnn = dense.to_mkldnn();
  }
  // this · wᵀ
  at::Tensor TimesTransposed(const at::Tensor& w) const {
    if (mkldnn.defined()) return at::mkldnn_linear(mkldnn, w.contiguous()).to_dense();
    return at::mm(dense, w.t());
  }
};

// The rows and scalings every candidate shares. Features are first
// standardised over all rows (`xg`, for float32 conditioning only); candidate
// k's own standardisation is then x_k = xg * scale[k] - shift[k], which a
// first layer absorbs, so one product over xg serves all K.
struct Problem {
  at::Tensor mu, sigma;     // D: the global standardisation
  at::Tensor xg;            // N × D
  at::Tensor y, onehot;     // N int64, N × C float
  at::Tensor rows;          // N × K float, 1 on candidate k's training rows
  at::Tensor inv_n, l2n;    // K: 1 / n_k and l2_k / n_k
  at::Tensor scale, shift;  // K × D
  // Rows are reordered so that rows with the same candidates are contiguous:
  // a block's product then skips every candidate that does not train on it
  // (a fold's own rows; with k folds, 1/k of the work).
  struct Block {
    int64_t start = 0, size = 0;
    at::Tensor members;  // K bool
    Operand x, x_t;      // its rows of xg, and their transpose
  };
  std::vector<Block> blocks;
};

Problem MakeProblem(const at::Tensor& x_in, const at::Tensor& labels, int64_t classes,
                    const at::Tensor& train_rows, const std::vector<double>& l2) {
  Problem p;
  const auto [patterns, inverse, counts] =
      at::unique_dim(train_rows.to(at::kByte), 0, /*sorted=*/true, /*return_inverse=*/true,
                     /*return_counts=*/true);
  const at::Tensor order = std::get<1>(inverse.sort(/*stable=*/true, 0, false));
  for (int64_t b = 0, start = 0; b < patterns.size(0); ++b) {
    const int64_t size = counts[b].item<int64_t>();
    Problem::Block block;
    block.start = start, block.size = size, block.members = patterns[b].to(at::kBool);
    p.blocks.push_back(std::move(block));
    start += size;
  }
  const at::Tensor x = x_in.to(at::kFloat).index_select(0, order);
  p.mu = x.mean(0);
  const at::Tensor sd = x.std(0, /*unbiased=*/false);
  p.sigma = at::where(sd > 1e-12, sd, at::ones_like(sd));
  p.xg = (x - p.mu) / p.sigma;
  for (Problem::Block& block : p.blocks) {
    const at::Tensor rows = p.xg.narrow(0, block.start, block.size);
    block.x = Operand(rows);
    block.x_t = Operand(rows.t());
  }
  p.y = labels.to(at::kLong).index_select(0, order);
  p.onehot = at::one_hot(p.y, classes).to(at::kFloat);
  p.rows = train_rows.to(at::kFloat).index_select(0, order);
  const at::Tensor n = p.rows.sum(0);
  p.inv_n = 1 / n;
  p.l2n = at::tensor(l2, at::kDouble).to(at::kFloat) * p.inv_n;
  const at::Tensor mean = at::mm(p.rows.t(), p.xg) * p.inv_n.unsqueeze(1);
  const at::Tensor var =
      (at::mm(p.rows.t(), p.xg * p.xg) * p.inv_n.unsqueeze(1) - mean * mean).clamp_min(0);
  // A feature constant on a candidate's rows is centred, not scaled (as
  // scikit-learn's StandardScaler does).
  const at::Tensor dev = var.sqrt();
  p.scale = at::where(dev > 1e-6, 1 / dev, at::ones_like(dev));
  p.shift = mean * p.scale;
  return p;
}

// First-layer weights that take x_k (candidate k's standardised features),
// rewritten to take xg (raw = false) or raw features (raw = true).
std::pair<at::Tensor, at::Tensor> Fold(const Problem& p, const at::Tensor& ids, const at::Tensor& w,
                                       const at::Tensor& b, bool raw) {
  at::Tensor scale = p.scale.index_select(0, ids), shift = p.shift.index_select(0, ids);
  if (raw) {
    scale = scale / p.sigma;
    shift = shift + p.mu * scale;
  }
  return {w * scale.unsqueeze(2), b - at::bmm(shift.unsqueeze(1), w).squeeze(1)};
}

// Objective values (k) and gradients (k × (D+1) × C, bias last) of the
// linear candidates `ids` at `theta`, by hand: no autograd graph to build.
// Logits are laid out rows × C × candidates, candidates innermost, because
// reductions over a handful of classes are slow with the classes innermost
// (log_softmax over [2000, 50, 5] took as long as the matrix product).
std::pair<at::Tensor, at::Tensor> LinearObjective(const Problem& p, const at::Tensor& ids,
                                                  const at::Tensor& theta) {
  const int64_t d = p.xg.size(1), k = theta.size(0), c = theta.size(2);
  const at::Tensor w = theta.narrow(1, 0, d), b = theta.select(1, d);
  const auto [a, b_eff] = Fold(p, ids, w, b, /*raw=*/false);
  const at::Tensor a_ckd = a.permute({2, 0, 1});
  const at::Tensor inv_n = p.inv_n.index_select(0, ids);
  at::Tensor f = at::zeros({k}), ga = at::zeros({d, c, k}), gb = at::zeros({c, k});
  for (const Problem::Block& block : p.blocks) {
    const at::Tensor sel = block.members.index_select(0, ids).nonzero().view(-1);
    const int64_t kb = sel.numel(), nb = block.size;
    if (kb == 0) continue;
    const at::Tensor z =
        block.x.TimesTransposed(a_ckd.index_select(1, sel).reshape({c * kb, d})).view({nb, c, kb}) +
        b_eff.index_select(0, sel).t().unsqueeze(0);
    const at::Tensor top = std::get<0>(z.max(1, /*keepdim=*/true));
    // Probabilities below e^-60 are kept at e^-60: products of subnormal
    // floats slowed the gradient's matrix product by 20% or more.
    const at::Tensor e = (z - top).clamp_min_(-60).exp_();
    const at::Tensor sum = e.sum(1);  // nb × kb
    const at::Tensor zy =
        z.gather(1, p.y.narrow(0, block.start, nb).view({nb, 1, 1}).expand({nb, 1, kb}));
    const at::Tensor wb = inv_n.index_select(0, sel);
    f.index_add_(0, sel, (sum.log() + top.squeeze(1) - zy.squeeze(1)).sum(0) * wb);
    // d loss / d z = (softmax - onehot) / n, per row and candidate.
    const at::Tensor r =
        e.mul_((wb / sum).unsqueeze(1)).sub_(p.onehot.narrow(0, block.start, nb).unsqueeze(2) * wb);
    ga.index_add_(2, sel, block.x_t.TimesTransposed(r.view({nb, c * kb}).t()).view({d, c, kb}));
    gb.index_add_(1, sel, r.sum(0));
  }
  const at::Tensor l2n = p.l2n.index_select(0, ids);
  f += 0.5 * l2n * w.pow(2).sum({1, 2});
  const at::Tensor scale = p.scale.index_select(0, ids), shift = p.shift.index_select(0, ids);
  const at::Tensor gbk = gb.t();
  const at::Tensor gw = ga.permute({2, 0, 1}) * scale.unsqueeze(2) -
                        shift.unsqueeze(2) * gbk.unsqueeze(1) + l2n.view({k, 1, 1}) * w;
  return {f, at::cat({gw, gbk.unsqueeze(1)}, 1)};
}

// L-BFGS's two-loop recursion for each row of g at once; history slots with
// rho = 0 (empty, or skipped for lack of curvature) contribute nothing.
at::Tensor Direction(const at::Tensor& g, const at::Tensor& s, const at::Tensor& y,
                     const at::Tensor& rho, const at::Tensor& gamma, int64_t newest) {
  const int64_t h = s.size(0);
  at::Tensor q = g.clone();
  std::vector<at::Tensor> alpha(h);
  for (int64_t j = 0; j < h; ++j) {
    const int64_t i = (newest - j + h) % h;
    alpha[j] = rho[i] * (s[i] * q).sum(1);
    q -= alpha[j].unsqueeze(1) * y[i];
  }
  at::Tensor r = q * gamma.unsqueeze(1);
  for (int64_t j = h - 1; j >= 0; --j) {
    const int64_t i = (newest - j + h) % h;
    const at::Tensor beta = rho[i] * (y[i] * r).sum(1);
    r += s[i] * (alpha[j] - beta).unsqueeze(1);
  }
  return -r;
}

absl::Status FitLinear(const Problem& p, int64_t classes, const StackedFitOptions& o,
                       const StackedHeads* warm_start, const std::function<bool()>& cancelled,
                       StackedHeads& out) {
  const int64_t kk = p.rows.size(1), d = p.xg.size(1), m = (d + 1) * classes;
  const int64_t h = std::max(1, o.history);
  auto eval = [&](const at::Tensor& ids, const at::Tensor& x) {
    auto [f, g] = LinearObjective(p, ids, x.view({-1, d + 1, classes}));
    return std::make_pair(f, g.reshape({-1, m}));
  };
  at::Tensor result = at::zeros({kk, m}), objective = at::zeros({kk}, at::kDouble);
  at::Tensor iterations = at::zeros({kk}, at::kLong);
  // The state of the candidates still running, compacted as they finish.
  at::Tensor ids = at::arange(kk, at::kLong), x = at::zeros({kk, m});
  if (warm_start != nullptr) {
    // Fold's inverse: raw-feature weights into each candidate's standardised ones.
    const at::Tensor scale = p.scale / p.sigma, shift = p.shift + p.mu * scale;
    const at::Tensor a = warm_start->weight[0].to(at::kFloat) / scale.unsqueeze(2);
    const at::Tensor b =
        warm_start->bias[0].to(at::kFloat) + at::bmm(shift.unsqueeze(1), a).squeeze(1);
    x = at::cat({a, b.unsqueeze(1)}, 1).reshape({kk, m});
  }
  // Not a structured binding: `retire` captures them (clang 14 refuses that).
  at::Tensor f, g;
  std::tie(f, g) = eval(ids, x);
  at::Tensor s = at::zeros({h, kk, m}), yh = at::zeros({h, kk, m}), rho = at::zeros({h, kk});
  at::Tensor gamma = at::ones({kk}), iters = at::zeros({kk}, at::kLong);
  auto retire = [&](const at::Tensor& done) {
    const at::Tensor idx = done.nonzero().view(-1);
    if (idx.numel() == 0) return;
    const at::Tensor who = ids.index_select(0, idx);
    result.index_copy_(0, who, x.index_select(0, idx));
    objective.index_copy_(0, who, f.index_select(0, idx).to(at::kDouble));
    iterations.index_copy_(0, who, iters.index_select(0, idx));
    const at::Tensor keep = done.logical_not().nonzero().view(-1);
    ids = ids.index_select(0, keep), x = x.index_select(0, keep), f = f.index_select(0, keep);
    g = g.index_select(0, keep), s = s.index_select(1, keep), yh = yh.index_select(1, keep);
    rho = rho.index_select(1, keep), gamma = gamma.index_select(0, keep);
    iters = iters.index_select(0, keep);
  };
  retire(g.abs().amax(1) <= o.tolerance);
  int64_t newest = h - 1;
  for (int it = 0; it < o.max_iterations && ids.numel() > 0; ++it) {
    if (cancelled && cancelled()) return absl::CancelledError("the sweep was cancelled");
    const at::Tensor dir = Direction(g, s, yh, rho, gamma, newest);
    const at::Tensor gtd = (g * dir).sum(1);
    // The first step has no curvature to scale it: as PyTorch's L-BFGS.
    at::Tensor t = it == 0 ? (1 / g.abs().sum(1)).clamp_max(1) : at::ones_like(f);
    at::Tensor x_new = x.clone(), f_new = f.clone(), g_new = g.clone();
    at::Tensor pending = gtd < 0;
    // Backtracking (Armijo) per candidate; only the unsettled ones are evaluated again.
    for (int ls = 0; ls < 25; ++ls) {
      const at::Tensor pi = pending.nonzero().view(-1);
      if (pi.numel() == 0) break;
      const at::Tensor tp = t.index_select(0, pi), fp = f.index_select(0, pi);
      const at::Tensor gp = gtd.index_select(0, pi);
      const at::Tensor xt = x.index_select(0, pi) + tp.unsqueeze(1) * dir.index_select(0, pi);
      auto [ft, gt] = eval(ids.index_select(0, pi), xt);
      const at::Tensor ok = ft.isfinite() & (ft <= fp + 1e-4 * tp * gp);
      const at::Tensor oi = ok.nonzero().view(-1), at_ok = pi.index_select(0, oi);
      x_new.index_copy_(0, at_ok, xt.index_select(0, oi));
      f_new.index_copy_(0, at_ok, ft.index_select(0, oi));
      g_new.index_copy_(0, at_ok, gt.index_select(0, oi));
      pending.index_fill_(0, at_ok, false);
      // Minimum of the quadratic through f, f' and the rejected point, kept in [t/10, t/2].
      const at::Tensor quad = -gp * tp * tp / (2 * (ft - fp - gp * tp));
      const at::Tensor next = at::where(quad.isfinite(), quad, tp * 0.5);
      t.index_copy_(0, pi, at::where(ok, tp, at::minimum(at::maximum(next, tp * 0.1), tp * 0.5)));
    }
    const at::Tensor failed = pending | (gtd >= 0);
    const at::Tensor sv = x_new - x, yv = g_new - g;
    const at::Tensor sy = (sv * yv).sum(1), yy = (yv * yv).sum(1);
    const at::Tensor curved = sy > 1e-10 * yy.sqrt() * sv.norm(2, 1);
    newest = (newest + 1) % h;
    s[newest].copy_(sv), yh[newest].copy_(yv);
    rho[newest].copy_(at::where(curved, 1 / sy, at::zeros_like(sy)));
    gamma = at::where(curved, sy / yy, gamma);
    x = x_new, f = f_new, g = g_new;
    iters += failed.logical_not().to(at::kLong);
    retire(failed | (g.abs().amax(1) <= o.tolerance));
  }
  retire(at::ones({ids.numel()}, at::kBool));
  const at::Tensor theta = result.view({kk, d + 1, classes});
  auto [w, b] = Fold(p, at::arange(kk, at::kLong), theta.narrow(1, 0, d), theta.select(1, d),
                     /*raw=*/true);
  out.weight = {w.contiguous()};
  out.bias = {b.contiguous()};
  out.objective = objective;
  out.iterations = iterations;
  return absl::OkStatus();
}

// K × B × C logits of rows xg (of the Problem's scaling) through a hidden layer.
at::Tensor HiddenForward(const at::Tensor& xg, const at::Tensor& a1, const at::Tensor& c1,
                         const at::Tensor& w2, const at::Tensor& b2) {
  const int64_t n = xg.size(0), d = xg.size(1), k = a1.size(0), hid = a1.size(2);
  const at::Tensor z1 =
      at::mm(xg, a1.permute({1, 0, 2}).reshape({d, k * hid})).view({n, k, hid}) + c1.unsqueeze(0);
  return at::baddbmm(b2.unsqueeze(1), at::relu(z1).permute({1, 0, 2}), w2);
}

// Per-candidate mean loss over its rows (weights: B × K of 1/n or masks) + L2.
at::Tensor HiddenObjective(const at::Tensor& logits, const at::Tensor& y, const at::Tensor& weights,
                           const at::Tensor& l2n, const at::Tensor& w1, const at::Tensor& w2) {
  const int64_t k = logits.size(0), n = logits.size(1);
  const at::Tensor nll =
      -at::log_softmax(logits, 2).gather(2, y.view({1, n, 1}).expand({k, n, 1})).squeeze(2);
  return (nll * weights.t()).sum(1) + 0.5 * l2n * (w1.pow(2).sum({1, 2}) + w2.pow(2).sum({1, 2}));
}

absl::Status FitHidden(const Problem& p, int64_t classes, const StackedFitOptions& o,
                       const std::function<bool()>& cancelled, StackedHeads& out) {
  const int64_t n = p.xg.size(0), d = p.xg.size(1), kk = p.rows.size(1), hid = o.hidden[0];
  const at::Tensor all = at::arange(kk, at::kLong);
  torch::AutoGradMode grad(true);  // a caller may hold a NoGradGuard
  at::Generator gen = at::detail::createCPUGenerator(o.seed);
  // nn::Linear's initialisation, drawn for each candidate.
  auto uniform = [&](std::vector<int64_t> shape, int64_t fan_in) {
    const double bound = 1 / std::sqrt(static_cast<double>(fan_in));
    return at::empty(shape).uniform_(-bound, bound, gen).requires_grad_();
  };
  at::Tensor w1 = uniform({kk, d, hid}, d), b1 = uniform({kk, hid}, d);
  at::Tensor w2 = uniform({kk, hid, classes}, hid), b2 = uniform({kk, classes}, hid);
  torch::optim::Adam adam({w1, b1, w2, b2}, torch::optim::AdamOptions(o.learning_rate));
  int epoch = 0;
  for (; epoch < o.epochs; ++epoch) {
    if (cancelled && cancelled()) return absl::CancelledError("the sweep was cancelled");
    const at::Tensor order = at::randperm(n, gen);
    for (int64_t start = 0; start < n; start += o.batch_size) {
      const at::Tensor idx = order.slice(0, start, std::min(n, start + o.batch_size));
      const at::Tensor rows = p.rows.index_select(0, idx);
      const at::Tensor weights = rows / rows.sum(0).clamp_min(1);
      adam.zero_grad();
      const auto [a1, c1] = Fold(p, all, w1, b1, /*raw=*/false);
      const at::Tensor loss =
          HiddenObjective(HiddenForward(p.xg.index_select(0, idx), a1, c1, w2, b2),
                          p.y.index_select(0, idx), weights, p.l2n, w1, w2)
              .sum();
      if (!std::isfinite(loss.item<double>())) {
        return absl::FailedPreconditionError(
            absl::StrCat("the sweep's hidden-layer heads diverged (loss ", loss.item<double>(),
                         ") in epoch ", epoch + 1, "; lower the learning rate"));
      }
      loss.backward();
      adam.step();
    }
  }
  torch::NoGradGuard no_grad;
  const auto [a1, c1] = Fold(p, all, w1, b1, /*raw=*/false);
  at::Tensor objective = at::zeros({kk});
  for (int64_t start = 0; start < n; start += 4096) {
    const int64_t len = std::min(n, start + 4096) - start;
    objective += HiddenObjective(HiddenForward(p.xg.narrow(0, start, len), a1, c1, w2, b2),
                                 p.y.narrow(0, start, len), p.rows.narrow(0, start, len) * p.inv_n,
                                 p.l2n * 0, w1, w2);
  }
  out.objective =
      (objective + 0.5 * p.l2n * (w1.pow(2).sum({1, 2}) + w2.pow(2).sum({1, 2}))).to(at::kDouble);
  auto [rw, rb] = Fold(p, all, w1, b1, /*raw=*/true);
  out.weight = {rw.contiguous(), w2.detach().clone()};
  out.bias = {rb.contiguous(), b2.detach().clone()};
  out.iterations = at::full({kk}, epoch, at::kLong);
  return absl::OkStatus();
}

}  // namespace

at::Tensor StackedHeads::Logits(const at::Tensor& x_in) const {
  torch::NoGradGuard no_grad;
  const at::Tensor x = x_in.to(at::kFloat);
  const int64_t n = x.size(0), d = x.size(1), k = size(), out = weight[0].size(2);
  at::Tensor z = at::mm(x, weight[0].permute({1, 0, 2}).reshape({d, k * out})).view({n, k, out}) +
                 bias[0].unsqueeze(0);
  z = z.permute({1, 0, 2});
  if (weight.size() == 2) z = at::baddbmm(bias[1].unsqueeze(1), at::relu(z), weight[1]);
  return z.contiguous();
}

torch::nn::Sequential StackedHeads::Head(int64_t k) const {
  HeadSpec spec;
  spec.hidden = hidden;
  torch::nn::Sequential head = MakeHead(spec, weight[0].size(1), weight.back().size(2));
  torch::NoGradGuard no_grad;
  int64_t layer = 0;
  for (const auto& module : head->children()) {
    auto* linear = module->as<torch::nn::LinearImpl>();
    if (linear == nullptr) continue;
    linear->weight.copy_(weight[layer][k].t());
    linear->bias.copy_(bias[layer][k]);
    ++layer;
  }
  head->eval();
  return head;
}

absl::StatusOr<StackedHeads> FitStackedHeads(const at::Tensor& x, const at::Tensor& labels,
                                             int64_t classes, const at::Tensor& train_rows,
                                             const std::vector<double>& l2,
                                             const StackedFitOptions& options,
                                             const std::function<bool()>& cancelled,
                                             const StackedHeads* warm_start) {
  const Problem p = MakeProblem(x, labels, classes, train_rows, l2);
  StackedHeads out;
  out.hidden = options.hidden;
  absl::Status status = options.hidden.empty()
                            ? FitLinear(p, classes, options, warm_start, cancelled, out)
                            : FitHidden(p, classes, options, cancelled, out);
  if (!status.ok()) return status;
  return out;
}

}  // namespace tlserve
