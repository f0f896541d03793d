// Links the imaml_fast library through its C ABI and checks prox_update_cpu (float64 and
// float32, shared and per-task theta) and batched_dot_cpu against hand-written loops.
// Exit code 0 on success (ctest), 1 with a message otherwise.
#include <imaml_fast/imaml_fast.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

template <typename T>
void check_prox(int dtype, bool per_task) {
  const int64_t T_ = 3, P = 37;  // P not a multiple of any block or vector width
  const double lr = 0.1, lam = 2.0;
  std::vector<T> phi(T_ * P), g(T_ * P), theta(per_task ? T_ * P : P), out(T_ * P);
  for (int64_t i = 0; i < T_ * P; ++i) {
    phi[i] = static_cast<T>(std::sin(0.37 * i));
    g[i] = static_cast<T>(std::cos(0.11 * i));
  }
  for (size_t i = 0; i < theta.size(); ++i) theta[i] = static_cast<T>(0.5 - 0.01 * i);
  const int rc = prox_update_cpu(dtype, phi.data(), g.data(), theta.data(), per_task ? 1 : 0,
                                 out.data(), T_, P, lr, lam);
  expect(rc == IMF_OK, "prox_update_cpu returned an error");
  double worst = 0;
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t i = 0; i < P; ++i) {
      const T th = theta[per_task ? t * P + i : i];
      const T ph = phi[t * P + i];
      const T want = ph - static_cast<T>(lr) * (g[t * P + i] + static_cast<T>(lam) * (ph - th));
      worst = std::fmax(worst, std::fabs(static_cast<double>(out[t * P + i] - want)));
    }
  expect(worst == 0.0, "prox_update_cpu differs from the hand loop");
  std::printf("prox_update_cpu dtype=%d per_task=%d: max |diff| = %g\n", dtype, per_task ? 1 : 0,
              worst);
}

void check_dot() {
  const int64_t T_ = 2, P = 1001;
  std::vector<double> a(T_ * P), b(T_ * P), out(T_);
  for (int64_t i = 0; i < T_ * P; ++i) {
    a[i] = 1.0 / (1 + i);
    b[i] = (i % 7) - 3.0;
  }
  expect(batched_dot_cpu(IMF_FLOAT64, a.data(), b.data(), out.data(), T_, P) == IMF_OK,
         "batched_dot_cpu returned an error");
  for (int64_t t = 0; t < T_; ++t) {
    double want = 0;
    for (int64_t i = 0; i < P; ++i) want += a[t * P + i] * b[t * P + i];
    expect(std::fabs(out[t] - want) <= 1e-12 * (1 + std::fabs(want)), "batched_dot_cpu is off");
  }
}

}  // namespace

int main() {
  check_prox<double>(IMF_FLOAT64, false);
  check_prox<double>(IMF_FLOAT64, true);
  check_prox<float>(IMF_FLOAT32, false);
  check_prox<float>(IMF_FLOAT32, true);
  check_dot();
  // The C ABI rejects what the CPU twin cannot do, with a code and a message.
  const int rc = prox_update_cpu(IMF_FLOAT16, nullptr, nullptr, nullptr, 0, nullptr, 1, 1, 0, 0);
  expect(rc == IMF_ERR_NULL || rc == IMF_ERR_DTYPE, "float16 on the CPU twin was not rejected");
  std::printf("library: abi %d, cuda %d (%s)\n", imaml_fast_abi_version(), imaml_fast_has_cuda(),
              imaml_fast_has_cuda() ? imaml_fast_cuda_archs() : imaml_fast_no_cuda_reason());
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
