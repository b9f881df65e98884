// Small helpers for absl::Status plumbing (absl does not ship these publicly).
#pragma once
#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define AMOEBA_CONCAT_INNER(a, b) a##b
#define AMOEBA_CONCAT(a, b) AMOEBA_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)    \
  do {                           \
    ::absl::Status _st = (expr); \
    if (!_st.ok()) return _st;   \
  } while (0)

#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(AMOEBA_CONCAT(_statusor_, __LINE__), lhs, expr)
