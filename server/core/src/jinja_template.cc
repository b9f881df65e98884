#include "server/jinja_template.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <stdexcept>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace amoeba {
namespace {

using json = nlohmann::ordered_json;

// Errors unwind the parser and the evaluator to Parse / Render, which turn them into a status.
struct JinjaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// break / continue unwind to their loop.
struct LoopControl {
  bool is_break;
};

json Undefined() {
  return json(json::value_t::discarded);
}
bool IsUndefined(const json& v) {
  return v.is_discarded();
}

// ---------------------------------------------------------------------------------------------
// Lexing: template text into text, {{ expression }} and {% statement %} pieces.

struct Token {
  enum Kind { kName, kString, kInt, kFloat, kOp, kEnd } kind = kEnd;
  std::string text;
  int64_t i = 0;
  double f = 0;
};

struct Piece {
  enum Kind { kText, kExpr, kStmt } kind;
  std::string text;           // kText
  std::vector<Token> tokens;  // kExpr, kStmt
  int line = 1;
};

std::vector<Token> Tokenize(std::string_view s, int line) {
  std::vector<Token> out;
  size_t i = 0;
  auto fail = [&](const std::string& what) {
    throw JinjaError(absl::StrCat("line ", line, ": ", what));
  };
  while (i < s.size()) {
    const char c = s[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Token::kName, std::string(s.substr(i, j - i))});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) ||
                              (s[j] == '.' && j + 1 < s.size() &&
                               std::isdigit(static_cast<unsigned char>(s[j + 1]))))) {
        is_float |= s[j] == '.';
        ++j;
      }
      Token t{is_float ? Token::kFloat : Token::kInt, std::string(s.substr(i, j - i))};
      if (is_float)
        t.f = std::stod(t.text);
      else
        t.i = std::stoll(t.text);
      out.push_back(t);
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          const char e = s[++j];
          switch (e) {
            case 'n':
              v += '\n';
              break;
            case 't':
              v += '\t';
              break;
            case 'r':
              v += '\r';
              break;
            case '\\':
              v += '\\';
              break;
            case '\'':
              v += '\'';
              break;
            case '"':
              v += '"';
              break;
            default:
              v += '\\';
              v += e;
          }
        } else {
          v += s[j];
        }
      }
      if (j >= s.size()) fail("unterminated string");
      out.push_back({Token::kString, v});
      i = j + 1;
    } else {
      static const char* kOps[] = {"**", "//", "==", "!=", "<=", ">=", "(", ")", "[",
                                   "]",  "{",  "}",  ".",  ",",  ":",  "|", "+", "-",
                                   "*",  "/",  "%",  "~",  "<",  ">",  "="};
      bool found = false;
      for (const char* op : kOps) {
        const size_t n = std::strlen(op);
        if (s.substr(i, n) == op) {
          out.push_back({Token::kOp, op});
          i += n;
          found = true;
          break;
        }
      }
      if (!found) fail(absl::StrCat("unexpected character '", std::string(1, c), "'"));
    }
  }
  return out;
}

std::vector<Piece> Split(std::string_view src) {
  std::vector<Piece> pieces;
  size_t pos = 0;
  int line = 1;
  bool strip_next = false;  // the previous tag ended with '-'
  bool trim_next = false;   // ... or was a block: drop one newline (trim_blocks)
  auto add_text = [&](std::string text) {
    if (strip_next) {
      size_t k = 0;
      while (k < text.size() && std::isspace(static_cast<unsigned char>(text[k]))) ++k;
      text.erase(0, k);
    } else if (trim_next && !text.empty() && text[0] == '\n') {
      text.erase(0, 1);
    }
    strip_next = trim_next = false;
    return text;
  };
  while (pos <= src.size()) {
    const size_t at = src.find('{', pos);
    size_t open = std::string_view::npos;
    for (size_t k = at; k != std::string_view::npos && k + 1 < src.size(); k = src.find('{', k + 1))
      if (src[k + 1] == '{' || src[k + 1] == '%' || src[k + 1] == '#') {
        open = k;
        break;
      }
    std::string text = add_text(std::string(
        src.substr(pos, open == std::string_view::npos ? std::string_view::npos : open - pos)));
    if (open == std::string_view::npos) {
      if (!text.empty()) pieces.push_back({Piece::kText, text, {}, line});
      break;
    }
    const char kind = src[open + 1];
    size_t body = open + 2;
    const bool block = kind == '%' || kind == '#';
    if (body < src.size() && src[body] == '-') {
      while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())))
        text.pop_back();
      ++body;
    } else if (body < src.size() && src[body] == '+') {
      ++body;
    } else if (block) {
      // lstrip_blocks: the spaces and tabs before a tag that starts its line (in the source).
      size_t b = open;
      while (b > 0 && (src[b - 1] == ' ' || src[b - 1] == '\t')) --b;
      if (b == 0 || src[b - 1] == '\n') text.erase(text.size() - std::min(text.size(), open - b));
    }
    if (!text.empty()) pieces.push_back({Piece::kText, text, {}, line});
    for (char ch : src.substr(pos, open - pos))
      if (ch == '\n') ++line;
    const char close0 = kind == '{' ? '}' : kind;
    // The closer, outside string literals.
    size_t k = body;
    char quote = 0;
    for (; k + 1 < src.size(); ++k) {
      if (quote) {
        if (src[k] == '\\')
          ++k;
        else if (src[k] == quote)
          quote = 0;
      } else if (kind != '#' && (src[k] == '\'' || src[k] == '"')) {
        quote = src[k];
      } else if (src[k] == close0 && src[k + 1] == '}') {
        break;
      }
    }
    if (k + 1 >= src.size()) throw JinjaError(absl::StrCat("line ", line, ": unclosed tag"));
    size_t end = k;
    if (end > body && src[end - 1] == '-') {
      strip_next = true;
      --end;
    } else if (block) {
      trim_next = true;
    }
    const std::string_view inner = src.substr(body, end - body);
    if (kind == '{') pieces.push_back({Piece::kExpr, "", Tokenize(inner, line), line});
    if (kind == '%') pieces.push_back({Piece::kStmt, "", Tokenize(inner, line), line});
    for (char ch : src.substr(open, k + 2 - open))
      if (ch == '\n') ++line;
    pos = k + 2;
  }
  return pieces;
}

// ---------------------------------------------------------------------------------------------
// Expressions.

struct Expr {
  enum Kind {
    kLiteral,
    kName,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNot,
    kNeg,
    kBinary,
    kAnd,
    kOr,
    kCond,
    kList,
    kDict
  } kind;
  json value;                               // kLiteral
  std::string name;                         // kName, kAttr, kFilter, kTest, kBinary (the operator)
  std::vector<std::unique_ptr<Expr>> args;  // operands / call arguments / list items
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
  bool negated = false;  // kTest
};
using ExprPtr = std::unique_ptr<Expr>;

ExprPtr Make(Expr::Kind k) {
  auto e = std::make_unique<Expr>();
  e->kind = k;
  return e;
}

class ExprParser {
 public:
  ExprParser(const std::vector<Token>& t, size_t pos, int line) : t_(t), pos_(pos), line_(line) {}

  ExprPtr Parse() { return Conditional(); }
  size_t pos() const { return pos_; }
  bool AtEnd() const { return pos_ >= t_.size(); }
  [[noreturn]] void Fail(const std::string& what) const {
    throw JinjaError(absl::StrCat("line ", line_, ": ", what));
  }
  bool IsOp(const char* op) const {
    return pos_ < t_.size() && t_[pos_].kind == Token::kOp && t_[pos_].text == op;
  }
  bool IsName(const char* n) const {
    return pos_ < t_.size() && t_[pos_].kind == Token::kName && t_[pos_].text == n;
  }
  void Expect(const char* op) {
    if (!IsOp(op)) Fail(absl::StrCat("expected '", op, "'"));
    ++pos_;
  }
  std::string Name() {
    if (pos_ >= t_.size() || t_[pos_].kind != Token::kName) Fail("expected a name");
    return t_[pos_++].text;
  }

 private:
  ExprPtr Conditional() {
    ExprPtr e = Or();
    while (IsName("if")) {
      ++pos_;
      auto c = Make(Expr::kCond);
      ExprPtr cond = Or();
      ExprPtr other;
      if (IsName("else")) {
        ++pos_;
        other = Conditional();
      } else {
        other = Make(Expr::kLiteral);
        other->value = Undefined();
      }
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(other));
      e = std::move(c);
    }
    return e;
  }
  ExprPtr Or() {
    ExprPtr e = And();
    while (IsName("or")) {
      ++pos_;
      auto o = Make(Expr::kOr);
      o->args.push_back(std::move(e));
      o->args.push_back(And());
      e = std::move(o);
    }
    return e;
  }
  ExprPtr And() {
    ExprPtr e = Not();
    while (IsName("and")) {
      ++pos_;
      auto o = Make(Expr::kAnd);
      o->args.push_back(std::move(e));
      o->args.push_back(Not());
      e = std::move(o);
    }
    return e;
  }
  ExprPtr Not() {
    if (IsName("not")) {
      ++pos_;
      auto n = Make(Expr::kNot);
      n->args.push_back(Not());
      return n;
    }
    return Compare();
  }
  ExprPtr Binary(std::string op, ExprPtr l, ExprPtr r) {
    auto b = Make(Expr::kBinary);
    b->name = std::move(op);
    b->args.push_back(std::move(l));
    b->args.push_back(std::move(r));
    return b;
  }
  ExprPtr Compare() {
    ExprPtr e = Concat();
    for (;;) {
      bool matched = false;
      for (const char* op : {"==", "!=", "<=", ">=", "<", ">"})
        if (IsOp(op)) {
          ++pos_;
          e = Binary(op, std::move(e), Concat());
          matched = true;
          break;
        }
      if (matched) continue;
      if (IsName("in")) {
        ++pos_;
        e = Binary("in", std::move(e), Concat());
      } else if (IsName("not") && pos_ + 1 < t_.size() && t_[pos_ + 1].text == "in") {
        pos_ += 2;
        auto n = Make(Expr::kNot);
        n->args.push_back(Binary("in", std::move(e), Concat()));
        e = std::move(n);
      } else if (IsName("is")) {
        ++pos_;
        auto t = Make(Expr::kTest);
        if (IsName("not")) {
          ++pos_;
          t->negated = true;
        }
        t->name = Name();
        t->args.push_back(std::move(e));
        // One argument without parentheses (`is equalto 3`), or a call's.
        if (IsOp("(")) {
          ParseArgs(*t);
        } else if (pos_ < t_.size() &&
                   (t_[pos_].kind == Token::kString || t_[pos_].kind == Token::kInt ||
                    t_[pos_].kind == Token::kFloat)) {
          t->args.push_back(Primary());
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }
  ExprPtr Concat() {
    ExprPtr e = Additive();
    while (IsOp("~")) {
      ++pos_;
      e = Binary("~", std::move(e), Additive());
    }
    return e;
  }
  ExprPtr Additive() {
    ExprPtr e = Multiplicative();
    while (IsOp("+") || IsOp("-")) {
      const std::string op = t_[pos_++].text;
      e = Binary(op, std::move(e), Multiplicative());
    }
    return e;
  }
  ExprPtr Multiplicative() {
    ExprPtr e = Unary();
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const std::string op = t_[pos_++].text;
      e = Binary(op, std::move(e), Unary());
    }
    return e;
  }
  ExprPtr Unary() {
    if (IsOp("-")) {
      ++pos_;
      auto n = Make(Expr::kNeg);
      n->args.push_back(Unary());
      return n;
    }
    if (IsOp("+")) {
      ++pos_;
      return Unary();
    }
    ExprPtr e = Postfix();
    if (IsOp("**")) {
      ++pos_;
      e = Binary("**", std::move(e), Unary());
    }
    return e;
  }
  void ParseArgs(Expr& call) {
    Expect("(");
    while (!IsOp(")")) {
      if (pos_ + 1 < t_.size() && t_[pos_].kind == Token::kName && t_[pos_ + 1].text == "=" &&
          t_[pos_ + 1].kind == Token::kOp) {
        std::string k = t_[pos_].text;
        pos_ += 2;
        call.kwargs.emplace_back(std::move(k), Parse());
      } else {
        call.args.push_back(Parse());
      }
      if (!IsOp(",")) break;
      ++pos_;
    }
    Expect(")");
  }
  ExprPtr Postfix() {
    ExprPtr e = Primary();
    for (;;) {
      if (IsOp(".")) {
        ++pos_;
        auto a = Make(Expr::kAttr);
        a->name = Name();
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (IsOp("[")) {
        ++pos_;
        ExprPtr idx[3];
        bool slice = false;
        for (int part = 0; part < 3; ++part) {
          if (!IsOp(":") && !IsOp("]")) idx[part] = Parse();
          if (IsOp(":") && part < 2) {
            ++pos_;
            slice = true;
          } else {
            break;
          }
        }
        Expect("]");
        if (!slice && !idx[0]) Fail("an empty subscript");
        auto s = Make(slice ? Expr::kSlice : Expr::kItem);
        s->args.push_back(std::move(e));
        for (auto& p : idx) s->args.push_back(std::move(p));
        e = std::move(s);
      } else if (IsOp("(")) {
        auto c = Make(Expr::kCall);
        c->args.push_back(std::move(e));
        ParseArgs(*c);
        e = std::move(c);
      } else if (IsOp("|")) {
        ++pos_;
        auto f = Make(Expr::kFilter);
        f->name = Name();
        f->args.push_back(std::move(e));
        if (IsOp("(")) ParseArgs(*f);
        e = std::move(f);
      } else {
        return e;
      }
    }
  }
  ExprPtr Primary() {
    if (pos_ >= t_.size()) Fail("unexpected end of expression");
    const Token& t = t_[pos_];
    auto lit = [&](json v) {
      ++pos_;
      auto e = Make(Expr::kLiteral);
      e->value = std::move(v);
      return e;
    };
    switch (t.kind) {
      case Token::kString: {
        std::string s = t.text;
        ++pos_;
        while (pos_ < t_.size() && t_[pos_].kind == Token::kString) s += t_[pos_++].text;
        auto e = Make(Expr::kLiteral);
        e->value = s;
        return e;
      }
      case Token::kInt:
        return lit(t.i);
      case Token::kFloat:
        return lit(t.f);
      case Token::kName:
        if (t.text == "true" || t.text == "True") return lit(true);
        if (t.text == "false" || t.text == "False") return lit(false);
        if (t.text == "none" || t.text == "None") return lit(nullptr);
        {
          auto e = Make(Expr::kName);
          e->name = t.text;
          ++pos_;
          return e;
        }
      case Token::kOp:
        if (t.text == "(") {
          ++pos_;
          ExprPtr first = Parse();
          if (IsOp(",")) {  // a tuple: a list here
            auto l = Make(Expr::kList);
            l->args.push_back(std::move(first));
            while (IsOp(",")) {
              ++pos_;
              if (IsOp(")")) break;
              l->args.push_back(Parse());
            }
            first = std::move(l);
          }
          Expect(")");
          return first;
        }
        if (t.text == "[") {
          ++pos_;
          auto l = Make(Expr::kList);
          while (!IsOp("]")) {
            l->args.push_back(Parse());
            if (!IsOp(",")) break;
            ++pos_;
          }
          Expect("]");
          return l;
        }
        if (t.text == "{") {
          ++pos_;
          auto d = Make(Expr::kDict);
          while (!IsOp("}")) {
            d->args.push_back(Parse());
            Expect(":");
            d->args.push_back(Parse());
            if (!IsOp(",")) break;
            ++pos_;
          }
          Expect("}");
          return d;
        }
        break;
      default:
        break;
    }
    Fail(absl::StrCat("unexpected '", t.text, "'"));
  }

  const std::vector<Token>& t_;
  size_t pos_;
  int line_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Statements.

struct JinjaTemplate::Node {
  enum Kind {
    kBody,
    kText,
    kOutput,
    kIf,
    kFor,
    kSet,
    kBreak,
    kContinue,
    kMacro,
    kFilterBlock
  } kind = kBody;
  std::string text;            // kText
  std::vector<ExprPtr> exprs;  // kOutput: [e]; kIf: conditions; kFor: [iterable, filter?]
  std::vector<std::unique_ptr<Node>> children;  // kBody: statements; kIf: bodies (+ else)
  // kFor: loop variables; kSet: target (name[, attribute]); kMacro: name, then parameters (their
  // defaults in `exprs`, null where none).
  std::vector<std::string> names;
  int line = 0;
};

namespace {

using Node = JinjaTemplate::Node;

class StmtParser {
 public:
  explicit StmtParser(std::vector<Piece> pieces) : p_(std::move(pieces)) {}

  std::unique_ptr<Node> Run() {
    auto body = Body({});
    if (i_ < p_.size()) Fail(p_[i_], "unexpected end tag");
    return body;
  }

 private:
  [[noreturn]] static void Fail(const Piece& p, const std::string& what) {
    throw JinjaError(absl::StrCat("line ", p.line, ": ", what));
  }
  static std::string Keyword(const Piece& p) {
    return p.tokens.empty() || p.tokens[0].kind != Token::kName ? "" : p.tokens[0].text;
  }

  // Statements until one of `ends` (left for the caller), or the end.
  std::unique_ptr<Node> Body(const std::vector<std::string>& ends) {
    auto body = std::make_unique<Node>();
    while (i_ < p_.size()) {
      const Piece& p = p_[i_];
      if (p.kind == Piece::kText) {
        auto n = std::make_unique<Node>();
        n->kind = Node::kText;
        n->text = p.text;
        body->children.push_back(std::move(n));
        ++i_;
        continue;
      }
      if (p.kind == Piece::kExpr) {
        ExprParser ep(p.tokens, 0, p.line);
        auto n = std::make_unique<Node>();
        n->kind = Node::kOutput;
        n->exprs.push_back(ep.Parse());
        if (!ep.AtEnd()) ep.Fail("unexpected tokens after the expression");
        body->children.push_back(std::move(n));
        ++i_;
        continue;
      }
      const std::string kw = Keyword(p);
      if (std::find(ends.begin(), ends.end(), kw) != ends.end()) return body;
      body->children.push_back(Statement(p, kw));
    }
    if (!ends.empty()) throw JinjaError(absl::StrCat("missing {% ", ends.back(), " %}"));
    return body;
  }

  std::unique_ptr<Node> Statement(const Piece& p, const std::string& kw) {
    auto n = std::make_unique<Node>();
    n->line = p.line;
    ExprParser ep(p.tokens, 1, p.line);
    auto done = [&] {
      if (!ep.AtEnd()) ep.Fail(absl::StrCat("unexpected tokens in {% ", kw, " %}"));
    };
    ++i_;
    if (kw == "if") {
      n->kind = Node::kIf;
      n->exprs.push_back(ep.Parse());
      done();
      n->children.push_back(Body({"elif", "else", "endif"}));
      for (;;) {
        if (i_ >= p_.size()) Fail(p, "missing {% endif %}");
        const Piece& q = p_[i_++];
        const std::string k = Keyword(q);
        if (k == "endif") break;
        if (k == "elif") {
          ExprParser cp(q.tokens, 1, q.line);
          n->exprs.push_back(cp.Parse());
          n->children.push_back(Body({"elif", "else", "endif"}));
        } else {  // else
          n->children.push_back(Body({"endif"}));
        }
      }
      return n;
    }
    if (kw == "for") {
      n->kind = Node::kFor;
      n->names.push_back(ep.Name());
      while (ep.IsOp(",")) {
        ep.Expect(",");
        n->names.push_back(ep.Name());
      }
      if (!ep.IsName("in")) ep.Fail("expected 'in'");
      ep.Name();
      // The iterable stops before a filter `if` (no conditional expression here).
      std::vector<Token> iter(p.tokens.begin() + ep.pos(), p.tokens.end());
      size_t cut = iter.size();
      for (size_t k = 0; k < iter.size(); ++k)
        if (iter[k].kind == Token::kName && iter[k].text == "if") {
          cut = k;
          break;
        }
      std::vector<Token> head(iter.begin(), iter.begin() + cut), tail;
      ExprParser ip(head, 0, p.line);
      n->exprs.push_back(ip.Parse());
      if (!ip.AtEnd()) ip.Fail("unexpected tokens in {% for %}");
      if (cut < iter.size()) {
        tail.assign(iter.begin() + cut + 1, iter.end());
        ExprParser fp(tail, 0, p.line);
        n->exprs.push_back(fp.Parse());
      }
      n->children.push_back(Body({"else", "endfor"}));
      const Piece& q = p_[i_++];
      if (Keyword(q) == "else") {
        n->children.push_back(Body({"endfor"}));
        ++i_;
      }
      return n;
    }
    if (kw == "set") {
      n->kind = Node::kSet;
      n->names.push_back(ep.Name());
      if (ep.IsOp(".")) {
        ep.Expect(".");
        n->names.push_back(ep.Name());
      }
      if (!ep.IsOp("=")) {  // {% set x %}...{% endset %}: the body's output
        done();
        n->children.push_back(Body({"endset"}));
        ++i_;
        return n;
      }
      ep.Expect("=");
      n->exprs.push_back(ep.Parse());
      done();
      return n;
    }
    if (kw == "filter") {  // {% filter name %}...{% endfilter %}: the filter over the body's output
      n->kind = Node::kFilterBlock;
      n->names.push_back(ep.Name());
      done();
      n->children.push_back(Body({"endfilter"}));
      ++i_;
      return n;
    }
    if (kw == "macro") {
      n->kind = Node::kMacro;
      n->names.push_back(ep.Name());
      ep.Expect("(");
      while (!ep.IsOp(")")) {
        n->names.push_back(ep.Name());
        if (ep.IsOp("=")) {
          ep.Expect("=");
          n->exprs.push_back(ep.Parse());
        } else {
          n->exprs.push_back(nullptr);
        }
        if (!ep.IsOp(",")) break;
        ep.Expect(",");
      }
      ep.Expect(")");
      done();
      n->children.push_back(Body({"endmacro"}));
      ++i_;
      return n;
    }
    if (kw == "break" || kw == "continue") {
      n->kind = kw == "break" ? Node::kBreak : Node::kContinue;
      done();
      return n;
    }
    if (kw == "generation") {  // HF's marker of the assistant's tokens: renders its body
      auto body = Body({"endgeneration"});
      ++i_;
      return body;
    }
    Fail(p, absl::StrCat("unsupported tag '", kw, "'"));
  }

  std::vector<Piece> p_;
  size_t i_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Values: Python's truth, str() and repr(), and json.dumps.

bool Truthy(const json& v) {
  switch (v.type()) {
    case json::value_t::boolean:
      return v.get<bool>();
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return v.get<int64_t>() != 0;
    case json::value_t::number_float:
      return v.get<double>() != 0;
    case json::value_t::string:
      return !v.get_ref<const std::string&>().empty();
    case json::value_t::array:
    case json::value_t::object:
      return !v.empty();
    default:
      return false;
  }
}

std::string FloatRepr(double d) {
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (std::isnan(d)) return "nan";
  char buf[32];
  for (int prec = 1; prec <= 17; ++prec) {  // the shortest that reads back, as Python's repr
    std::snprintf(buf, sizeof buf, "%.*g", prec, d);
    if (std::stod(buf) == d) break;
  }
  std::string s = buf;
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string Repr(const json& v);

std::string Str(const json& v) {
  switch (v.type()) {
    case json::value_t::string:
      return v.get<std::string>();
    case json::value_t::boolean:
      return v.get<bool>() ? "True" : "False";
    case json::value_t::null:
      return "None";
    case json::value_t::discarded:
      return "";
    case json::value_t::number_float:
      return FloatRepr(v.get<double>());
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return std::to_string(v.get<int64_t>());
    default:
      return Repr(v);
  }
}

std::string Repr(const json& v) {
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
    std::string out(1, dq ? '"' : '\'');
    for (char c : s) {
      if (c == '\\')
        out += "\\\\";
      else if (c == '\n')
        out += "\\n";
      else if (c == '\t')
        out += "\\t";
      else if (c == '\r')
        out += "\\r";
      else if (c == '\'' && !dq)
        out += "\\'";
      else
        out += c;
    }
    return out + (dq ? '"' : '\'');
  }
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) absl::StrAppend(&out, i ? ", " : "", Repr(v[i]));
    return out + "]";
  }
  if (v.is_object()) {
    std::string out = "{";
    bool first = true;
    for (const auto& [k, x] : v.items()) {
      absl::StrAppend(&out, first ? "" : ", ", Repr(json(k)), ": ", Repr(x));
      first = false;
    }
    return out + "}";
  }
  return Str(v);
}

// Python's json.dumps(v, ensure_ascii=False, indent=indent): ", " and ": " without an indent.
void Dumps(const json& v, int indent, int depth, std::string& out) {
  auto newline = [&](int d) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent * d), ' ');
  };
  const char* sep = indent < 0 ? ", " : ",";
  if (v.is_array()) {
    if (v.empty()) {
      out += "[]";
      return;
    }
    out += '[';
    for (size_t i = 0; i < v.size(); ++i) {
      if (i) out += sep;
      newline(depth + 1);
      Dumps(v[i], indent, depth + 1, out);
    }
    newline(depth);
    out += ']';
  } else if (v.is_object()) {
    if (v.empty()) {
      out += "{}";
      return;
    }
    out += '{';
    bool first = true;
    for (const auto& [k, x] : v.items()) {
      if (!first) out += sep;
      first = false;
      newline(depth + 1);
      Dumps(json(k), indent, depth + 1, out);
      out += ": ";
      Dumps(x, indent, depth + 1, out);
    }
    newline(depth);
    out += '}';
  } else if (v.is_string()) {
    out += '"';
    for (unsigned char c : v.get_ref<const std::string&>()) {
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\b':
          out += "\\b";
          break;
        case '\f':
          out += "\\f";
          break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
          } else {
            out += static_cast<char>(c);
          }
      }
    }
    out += '"';
  } else if (v.is_boolean()) {
    out += v.get<bool>() ? "true" : "false";
  } else if (v.is_null() || v.is_discarded()) {
    out += "null";
  } else if (v.is_number_float()) {
    const double d = v.get<double>();
    out += std::isinf(d)   ? (d > 0 ? "Infinity" : "-Infinity")
           : std::isnan(d) ? "NaN"
                           : FloatRepr(d);
  } else {
    out += std::to_string(v.get<int64_t>());
  }
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

class Renderer {
 public:
  explicit Renderer(const json& context) { scopes_.push_back(context); }

  void Run(const Node& n, std::string& out) {
    switch (n.kind) {
      case Node::kBody:
        for (const auto& c : n.children) Run(*c, out);
        return;
      case Node::kText:
        out += n.text;
        return;
      case Node::kOutput:
        out += Str(Eval(*n.exprs[0]));
        return;
      case Node::kIf:
        for (size_t k = 0; k < n.children.size(); ++k)
          if (k >= n.exprs.size() || Truthy(Eval(*n.exprs[k]))) {
            Run(*n.children[k], out);
            return;
          }
        return;
      case Node::kFilterBlock: {
        std::string body;
        Run(*n.children[0], body);
        Expr f;
        f.kind = Expr::kFilter;
        f.name = n.names[0];
        auto lit = Make(Expr::kLiteral);
        lit->value = std::move(body);
        f.args.push_back(std::move(lit));
        out += Str(Filter(f));
        return;
      }
      case Node::kSet: {
        json v;
        if (n.exprs.empty()) {
          std::string body;
          Run(*n.children[0], body);
          v = std::move(body);
        } else {
          v = Eval(*n.exprs[0]);
        }
        if (n.names.size() == 1) {
          scopes_.back()[n.names[0]] = std::move(v);
        } else {
          json* target = Lookup(n.names[0]);
          if (!target || !target->is_object())
            Fail(n.line, absl::StrCat("cannot set an attribute of '", n.names[0], "'"));
          (*target)[n.names[1]] = std::move(v);
        }
        return;
      }
      case Node::kBreak:
        throw LoopControl{true};
      case Node::kContinue:
        throw LoopControl{false};
      case Node::kFor:
        For(n, out);
        return;
      case Node::kMacro:
        macros_[n.names[0]] = &n;
        return;
    }
  }

 private:
  [[noreturn]] static void Fail(int line, const std::string& what) {
    throw JinjaError(line ? absl::StrCat("line ", line, ": ", what) : what);
  }

  json* Lookup(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return &*f;
    }
    return nullptr;
  }

  void For(const Node& n, std::string& out) {
    json items = Eval(*n.exprs[0]);
    if (items.is_object()) {  // iterating a mapping gives its keys
      json keys = json::array();
      for (const auto& [k, _] : items.items()) keys.push_back(k);
      items = std::move(keys);
    } else if (items.is_string()) {
      json chars = json::array();
      for (char c : items.get<std::string>()) chars.push_back(std::string(1, c));
      items = std::move(chars);
    } else if (IsUndefined(items) || items.is_null()) {
      items = json::array();
    } else if (!items.is_array()) {
      Fail(n.line, "for: not iterable");
    }
    // The `if` filter applies before the loop variables are counted.
    std::vector<json> kept;
    for (const json& item : items) {
      if (n.exprs.size() > 1) {
        scopes_.push_back(json::object());
        Bind(n, item);
        const bool keep = Truthy(Eval(*n.exprs[1]));
        scopes_.pop_back();
        if (!keep) continue;
      }
      kept.push_back(item);
    }
    if (kept.empty()) {
      if (n.children.size() > 1) Run(*n.children[1], out);
      return;
    }
    scopes_.push_back(json::object());
    const int64_t len = static_cast<int64_t>(kept.size());
    for (int64_t i = 0; i < len; ++i) {
      Bind(n, kept[i]);
      scopes_.back()["loop"] = {{"index", i + 1},          {"index0", i},   {"first", i == 0},
                                {"last", i == len - 1},    {"length", len}, {"revindex", len - i},
                                {"revindex0", len - i - 1}};
      if (i > 0) scopes_.back()["loop"]["previtem"] = kept[i - 1];
      if (i + 1 < len) scopes_.back()["loop"]["nextitem"] = kept[i + 1];
      try {
        Run(*n.children[0], out);
      } catch (const LoopControl& c) {
        if (c.is_break) break;
      }
    }
    scopes_.pop_back();
  }

  void Bind(const Node& n, const json& item) {
    if (n.names.size() == 1) {
      scopes_.back()[n.names[0]] = item;
      return;
    }
    if (!item.is_array() || item.size() != n.names.size())
      Fail(n.line, "for: cannot unpack the item");
    for (size_t k = 0; k < n.names.size(); ++k) scopes_.back()[n.names[k]] = item[k];
  }

  static int64_t Int(const json& v, const char* what) {
    if (v.is_number_integer() || v.is_number_unsigned()) return v.get<int64_t>();
    if (v.is_boolean()) return v.get<bool>();
    Fail(0, absl::StrCat(what, ": expected an integer, got ", Repr(v)));
  }

  static json Index(const json& obj, const json& key) {
    if (obj.is_array() && (key.is_number_integer() || key.is_number_unsigned())) {
      int64_t i = key.get<int64_t>();
      if (i < 0) i += static_cast<int64_t>(obj.size());
      if (i < 0 || i >= static_cast<int64_t>(obj.size())) return Undefined();
      return obj[static_cast<size_t>(i)];
    }
    if (obj.is_string() && key.is_number_integer()) {
      const std::string& s = obj.get_ref<const std::string&>();
      int64_t i = key.get<int64_t>();
      if (i < 0) i += static_cast<int64_t>(s.size());
      if (i < 0 || i >= static_cast<int64_t>(s.size())) return Undefined();
      return std::string(1, s[static_cast<size_t>(i)]);
    }
    if (obj.is_object() && key.is_string()) {
      auto it = obj.find(key.get<std::string>());
      return it == obj.end() ? Undefined() : *it;
    }
    return Undefined();
  }

  json Slice(const json& obj, const json& a, const json& b, const json& c) {
    const int64_t step = IsUndefined(c) || c.is_null() ? 1 : Int(c, "slice step");
    if (step == 0) Fail(0, "slice step cannot be zero");
    const bool str = obj.is_string();
    if (!str && !obj.is_array()) return Undefined();
    const int64_t n = str ? static_cast<int64_t>(obj.get_ref<const std::string&>().size())
                          : static_cast<int64_t>(obj.size());
    auto bound = [&](const json& v, int64_t dflt) {
      if (IsUndefined(v) || v.is_null()) return dflt;
      int64_t i = Int(v, "slice");
      if (i < 0) i += n;
      return step > 0 ? std::clamp<int64_t>(i, 0, n) : std::clamp<int64_t>(i, -1, n - 1);
    };
    const int64_t lo = bound(a, step > 0 ? 0 : n - 1), hi = bound(b, step > 0 ? n : -1);
    json out = str ? json("") : json::array();
    for (int64_t i = lo; step > 0 ? i < hi : i > hi; i += step) {
      if (str)
        out.get_ref<std::string&>() += obj.get_ref<const std::string&>()[static_cast<size_t>(i)];
      else
        out.push_back(obj[static_cast<size_t>(i)]);
    }
    return out;
  }

  static bool Contains(const json& hay, const json& needle) {
    if (hay.is_string())
      return needle.is_string() && hay.get_ref<const std::string&>().find(
                                       needle.get_ref<const std::string&>()) != std::string::npos;
    if (hay.is_array()) return std::find(hay.begin(), hay.end(), needle) != hay.end();
    if (hay.is_object()) return needle.is_string() && hay.contains(needle.get<std::string>());
    return false;
  }

  json BinaryOp(const std::string& op, const json& l, const json& r) {
    if (op == "==") return l == r;
    if (op == "!=") return l != r;
    if (op == "in") return Contains(r, l);
    if (op == "~") return Str(l) + Str(r);
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      if (!((l.is_number() && r.is_number()) || (l.is_string() && r.is_string())))
        Fail(0, absl::StrCat("cannot compare ", Repr(l), " and ", Repr(r)));
      const bool lt = l < r, gt = r < l;
      return op == "<" ? lt : op == ">" ? gt : op == "<=" ? !gt : !lt;
    }
    if (op == "+") {
      if (l.is_string() && r.is_string()) return l.get<std::string>() + r.get<std::string>();
      if (l.is_array() && r.is_array()) {
        json out = l;
        for (const auto& x : r) out.push_back(x);
        return out;
      }
    }
    if (!l.is_number() || !r.is_number()) {
      if (op == "*" && l.is_string() && r.is_number_integer()) {
        std::string out;
        for (int64_t k = 0; k < r.get<int64_t>(); ++k) out += l.get<std::string>();
        return out;
      }
      Fail(0, absl::StrCat("unsupported operands for ", op, ": ", Repr(l), ", ", Repr(r)));
    }
    const bool ints = !l.is_number_float() && !r.is_number_float();
    if (ints && op != "/" && op != "**") {
      const int64_t a = l.get<int64_t>(), b = r.get<int64_t>();
      if ((op == "//" || op == "%") && b == 0) Fail(0, "division by zero");
      if (op == "+") return a + b;
      if (op == "-") return a - b;
      if (op == "*") return a * b;
      if (op == "//") return a / b - ((a % b != 0) && ((a < 0) != (b < 0)));
      if (op == "%") return ((a % b) + b) % b;
    }
    const double a = l.get<double>(), b = r.get<double>();
    if (op == "+") return a + b;
    if (op == "-") return a - b;
    if (op == "*") return a * b;
    if (op == "/") {
      if (b == 0) Fail(0, "division by zero");
      return a / b;
    }
    if (op == "**") {
      const double p = std::pow(a, b);
      if (ints && b >= 0) return static_cast<int64_t>(p);
      return p;
    }
    if (op == "//") return std::floor(a / b);
    if (op == "%") return std::fmod(std::fmod(a, b) + b, b);
    Fail(0, absl::StrCat("unknown operator ", op));
  }

  std::vector<json> Args(const Expr& e, size_t from) {
    std::vector<json> out;
    for (size_t k = from; k < e.args.size(); ++k) out.push_back(Eval(*e.args[k]));
    return out;
  }
  json Kwarg(const Expr& e, const char* name) {
    for (const auto& [k, v] : e.kwargs)
      if (k == name) return Eval(*v);
    return Undefined();
  }

  json Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::kLiteral:
        return e.value;
      case Expr::kName: {
        const json* v = Lookup(e.name);
        return v ? *v : Undefined();
      }
      case Expr::kAttr: {
        const json obj = Eval(*e.args[0]);
        if (obj.is_object()) {
          auto it = obj.find(e.name);
          if (it != obj.end()) return *it;
        }
        return Undefined();
      }
      case Expr::kItem:
        return Index(Eval(*e.args[0]), Eval(*e.args[1]));
      case Expr::kSlice: {
        auto part = [&](size_t k) { return e.args[k] ? Eval(*e.args[k]) : Undefined(); };
        return Slice(Eval(*e.args[0]), part(1), part(2), part(3));
      }
      case Expr::kNot:
        return !Truthy(Eval(*e.args[0]));
      case Expr::kNeg: {
        const json v = Eval(*e.args[0]);
        if (v.is_number_float()) return -v.get<double>();
        return -Int(v, "negation");
      }
      case Expr::kAnd: {
        json l = Eval(*e.args[0]);
        return Truthy(l) ? Eval(*e.args[1]) : l;
      }
      case Expr::kOr: {
        json l = Eval(*e.args[0]);
        return Truthy(l) ? l : Eval(*e.args[1]);
      }
      case Expr::kCond:
        return Truthy(Eval(*e.args[1])) ? Eval(*e.args[0]) : Eval(*e.args[2]);
      case Expr::kBinary:
        return BinaryOp(e.name, Eval(*e.args[0]), Eval(*e.args[1]));
      case Expr::kList: {
        json out = json::array();
        for (const auto& a : e.args) out.push_back(Eval(*a));
        return out;
      }
      case Expr::kDict: {
        json out = json::object();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2)
          out[Str(Eval(*e.args[k]))] = Eval(*e.args[k + 1]);
        return out;
      }
      case Expr::kTest:
        return Test(e) != e.negated;
      case Expr::kFilter:
        return Filter(e);
      case Expr::kCall:
        return Call(e);
    }
    return Undefined();
  }

  bool Test(const Expr& e) {
    const json v = Eval(*e.args[0]);
    const std::string& t = e.name;
    if (t == "defined") return !IsUndefined(v);
    if (t == "undefined") return IsUndefined(v);
    if (t == "none") return v.is_null();
    if (t == "string") return v.is_string();
    if (t == "number") return v.is_number();
    if (t == "integer") return v.is_number_integer() || v.is_number_unsigned();
    if (t == "float") return v.is_number_float();
    if (t == "boolean") return v.is_boolean();
    if (t == "true") return v.is_boolean() && v.get<bool>();
    if (t == "false") return v.is_boolean() && !v.get<bool>();
    if (t == "mapping") return v.is_object();
    if (t == "sequence" || t == "iterable") return v.is_array() || v.is_string() || v.is_object();
    if (t == "odd" || t == "even") return (Int(v, t.c_str()) % 2 != 0) == (t == "odd");
    if (t == "equalto" || t == "eq" || t == "sameas") {
      if (e.args.size() < 2) Fail(0, "test " + t + " needs a value");
      return v == Eval(*e.args[1]);
    }
    if (t == "in") return e.args.size() > 1 && Contains(Eval(*e.args[1]), v);
    Fail(0, absl::StrCat("unknown test '", t, "'"));
  }

  // selectattr / rejectattr / select / reject: keep the items whose test (or truth) passes.
  json Select(const Expr& e, const json& items, bool by_attr, bool keep) {
    json out = json::array();
    const std::vector<json> args = Args(e, 1);
    size_t k = 0;
    std::string attr;
    if (by_attr) {
      if (args.empty() || !args[0].is_string()) Fail(0, e.name + ": needs an attribute name");
      attr = args[0].get<std::string>();
      k = 1;
    }
    for (const json& item : items.is_array() ? items : json::array()) {
      const json v = by_attr ? Index(item, json(attr)) : item;
      bool pass;
      if (k >= args.size()) {
        pass = Truthy(v);
      } else {
        Expr test;
        test.kind = Expr::kTest;
        test.name = args[k].get<std::string>();
        auto lit = Make(Expr::kLiteral);
        lit->value = v;
        test.args.push_back(std::move(lit));
        for (size_t m = k + 1; m < args.size(); ++m) {
          auto a = Make(Expr::kLiteral);
          a->value = args[m];
          test.args.push_back(std::move(a));
        }
        pass = Test(test);
      }
      if (pass == keep) out.push_back(item);
    }
    return out;
  }

  // Python's str.replace (the filter and the method).
  static std::string ReplaceAll(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size()))
      s.replace(p, from.size(), to);
    return s;
  }

  static std::string Trim(std::string s, const std::string& chars = " \t\n\r\f\v", bool left = true,
                          bool right = true) {
    if (right) {
      const size_t end = s.find_last_not_of(chars);
      s.erase(end == std::string::npos ? 0 : end + 1);
    }
    if (left) s.erase(0, std::min(s.size(), s.find_first_not_of(chars)));
    return s;
  }

  json Filter(const Expr& e) {
    const json v = Eval(*e.args[0]);
    const std::string& f = e.name;
    const std::vector<json> args = Args(e, 1);
    auto arg = [&](size_t k, const char* kw) {
      if (k < args.size()) return args[k];
      return Kwarg(e, kw);
    };
    if (f == "trim") return Trim(Str(v));
    if (f == "length" || f == "count") {
      if (v.is_string()) return v.get_ref<const std::string&>().size();
      return v.is_array() || v.is_object() ? v.size() : 0;
    }
    if (f == "tojson") {
      const json ind = arg(0, "indent");
      std::string out;
      Dumps(v, IsUndefined(ind) || ind.is_null() ? -1 : static_cast<int>(Int(ind, "indent")), 0,
            out);
      return out;
    }
    if (f == "string") return Str(v);
    if (f == "upper" || f == "lower") {
      std::string s = Str(v);
      for (char& c : s)
        c = static_cast<char>(f == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                           : std::tolower(static_cast<unsigned char>(c)));
      return s;
    }
    if (f == "capitalize" || f == "title") {
      std::string s = Str(v);
      bool start = true;
      for (char& c : s) {
        const auto u = static_cast<unsigned char>(c);
        c = static_cast<char>(start ? std::toupper(u) : std::tolower(u));
        start = f == "title" ? !std::isalpha(u) : false;
      }
      return s;
    }
    if (f == "default" || f == "d") {
      const json b = arg(1, "boolean");
      const bool use = IsUndefined(v) || (Truthy(b) && !Truthy(v));
      return use ? (args.empty() ? json("") : args[0]) : v;
    }
    if (f == "items") {
      json out = json::array();
      if (v.is_object())
        for (const auto& [k, x] : v.items()) out.push_back(json::array({k, x}));
      return out;
    }
    if (f == "list") {
      if (v.is_array()) return v;
      json out = json::array();
      if (v.is_string())
        for (char c : v.get<std::string>()) out.push_back(std::string(1, c));
      if (v.is_object())
        for (const auto& [k, _] : v.items()) out.push_back(k);
      return out;
    }
    if (f == "first" || f == "last") {
      if (!v.is_array() || v.empty()) return Undefined();
      return f == "first" ? v.front() : v.back();
    }
    if (f == "reverse") {
      if (v.is_string()) {
        std::string s = v.get<std::string>();
        std::reverse(s.begin(), s.end());
        return s;
      }
      json out = v.is_array() ? v : json::array();
      std::reverse(out.begin(), out.end());
      return out;
    }
    if (f == "join") {
      const json sep = arg(0, "d");
      std::string out;
      bool first = true;
      for (const json& x : v.is_array() ? v : json::array()) {
        if (!first) out += IsUndefined(sep) ? "" : Str(sep);
        out += Str(x);
        first = false;
      }
      return out;
    }
    if (f == "replace") {
      if (args.size() < 2) Fail(0, "replace: needs two strings");
      return ReplaceAll(Str(v), Str(args[0]), Str(args[1]));
    }
    if (f == "int") {
      if (v.is_number()) return static_cast<int64_t>(v.get<double>());
      try {
        return static_cast<int64_t>(std::stoll(Str(v)));
      } catch (...) {
        return 0;
      }
    }
    if (f == "float") {
      if (v.is_number()) return v.get<double>();
      try {
        return std::stod(Str(v));
      } catch (...) {
        return 0.0;
      }
    }
    if (f == "abs") {
      if (v.is_number_float()) return std::fabs(v.get<double>());
      return std::llabs(Int(v, "abs"));
    }
    if (f == "safe" || f == "e" || f == "escape") return f == "safe" ? v : json(Str(v));
    if (f == "selectattr" || f == "rejectattr") return Select(e, v, true, f == "selectattr");
    if (f == "select" || f == "reject") return Select(e, v, false, f == "select");
    if (f == "map") {
      const json attr = Kwarg(e, "attribute");
      json out = json::array();
      for (const json& x : v.is_array() ? v : json::array()) {
        if (!IsUndefined(attr)) {
          out.push_back(Index(x, attr));
        } else if (!args.empty() && args[0] == "string") {
          out.push_back(Str(x));
        } else {
          Fail(0, "map: only attribute= or 'string' are supported");
        }
      }
      return out;
    }
    if (f == "dictsort") {  // [key, value] pairs by key
      json out = json::array();
      if (v.is_object()) {
        std::vector<std::pair<std::string, json>> items;
        for (const auto& [k, x] : v.items()) items.emplace_back(k, x);
        std::sort(items.begin(), items.end(),
                  [](const auto& a, const auto& b) { return a.first < b.first; });
        for (auto& [k, x] : items) out.push_back(json::array({k, std::move(x)}));
      }
      return out;
    }
    if (f == "unique") {
      json out = json::array();
      for (const json& x : v.is_array() ? v : json::array())
        if (std::find(out.begin(), out.end(), x) == out.end()) out.push_back(x);
      return out;
    }
    Fail(0, absl::StrCat("unknown filter '", f, "'"));
  }

  json Call(const Expr& e) {
    const Expr& callee = *e.args[0];
    if (callee.kind == Expr::kName && macros_.count(callee.name) && !Lookup(callee.name))
      return CallMacro(*macros_[callee.name], e);
    const std::vector<json> args = Args(e, 1);
    if (callee.kind == Expr::kName && !Lookup(callee.name)) {
      const std::string& fn = callee.name;
      if (fn == "raise_exception")
        Fail(0, absl::StrCat("the template raised: ", args.empty() ? "" : Str(args[0])));
      if (fn == "namespace") {
        json ns = json::object();
        for (const auto& [k, v] : e.kwargs) ns[k] = Eval(*v);
        return ns;
      }
      if (fn == "range") {
        int64_t lo = 0, hi = 0, step = 1;
        if (args.size() == 1) {
          hi = Int(args[0], "range");
        } else if (args.size() >= 2) {
          lo = Int(args[0], "range");
          hi = Int(args[1], "range");
          if (args.size() > 2) step = Int(args[2], "range");
        }
        if (step == 0) Fail(0, "range: step 0");
        json out = json::array();
        for (int64_t i = lo; step > 0 ? i < hi : i > hi; i += step) out.push_back(i);
        return out;
      }
      if (fn == "strftime_now") {
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        localtime_r(&now, &tm);
        char buf[128];
        const size_t n =
            std::strftime(buf, sizeof buf, args.empty() ? "%Y-%m-%d" : Str(args[0]).c_str(), &tm);
        return std::string(buf, n);
      }
      if (fn == "dict") {
        json d = json::object();
        for (const auto& [k, v] : e.kwargs) d[k] = Eval(*v);
        return d;
      }
      Fail(0, absl::StrCat("unknown function '", fn, "'"));
    }
    if (callee.kind != Expr::kAttr) Fail(0, "only functions and methods can be called");
    const json obj = Eval(*callee.args[0]);
    const std::string& m = callee.name;
    if (obj.is_string()) {
      const std::string s = obj.get<std::string>();
      const std::string chars = args.empty() || args[0].is_null() ? " \t\n\r\f\v" : Str(args[0]);
      if (m == "strip") return Trim(s, chars);
      if (m == "lstrip") return Trim(s, chars, true, false);
      if (m == "rstrip") return Trim(s, chars, false, true);
      if (m == "startswith" || m == "endswith") {
        if (args.empty()) Fail(0, m + ": needs a string");
        const std::string p = Str(args[0]);
        if (p.size() > s.size()) return false;
        return m == "startswith" ? s.compare(0, p.size(), p) == 0
                                 : s.compare(s.size() - p.size(), p.size(), p) == 0;
      }
      if (m == "upper" || m == "lower" || m == "title" || m == "capitalize") {
        Expr f;
        f.kind = Expr::kFilter;
        f.name = m;
        auto lit = Make(Expr::kLiteral);
        lit->value = s;
        f.args.push_back(std::move(lit));
        return Filter(f);
      }
      if (m == "replace") {
        if (args.size() < 2) Fail(0, "replace: needs two strings");
        return ReplaceAll(s, Str(args[0]), Str(args[1]));
      }
      if (m == "split") {
        json out = json::array();
        if (args.empty() || args[0].is_null()) {
          size_t p = 0;
          while (p < s.size()) {
            while (p < s.size() && std::isspace(static_cast<unsigned char>(s[p]))) ++p;
            size_t q = p;
            while (q < s.size() && !std::isspace(static_cast<unsigned char>(s[q]))) ++q;
            if (q > p) out.push_back(s.substr(p, q - p));
            p = q;
          }
          return out;
        }
        const std::string sep = Str(args[0]);
        if (sep.empty()) Fail(0, "split: empty separator");
        int64_t max = args.size() > 1 ? Int(args[1], "split") : -1;
        size_t p = 0;
        for (size_t q; max != 0 && (q = s.find(sep, p)) != std::string::npos; --max) {
          out.push_back(s.substr(p, q - p));
          p = q + sep.size();
        }
        out.push_back(s.substr(p));
        return out;
      }
      if (m == "format") {
        std::string out;
        size_t next = 0;
        for (size_t p = 0; p < s.size(); ++p) {
          if (s[p] == '{' && p + 1 < s.size() && s[p + 1] == '}') {
            out += next < args.size() ? Str(args[next++]) : "";
            ++p;
          } else {
            out += s[p];
          }
        }
        return out;
      }
    }
    if (obj.is_object()) {
      if (m == "items" || m == "keys" || m == "values") {
        json out = json::array();
        for (const auto& [k, x] : obj.items())
          out.push_back(m == "items" ? json::array({k, x}) : m == "keys" ? json(k) : x);
        return out;
      }
      if (m == "get") {
        if (args.empty()) Fail(0, "get: needs a key");
        const json v = Index(obj, args[0]);
        return IsUndefined(v) ? (args.size() > 1 ? args[1] : json(nullptr)) : v;
      }
    }
    Fail(0, absl::StrCat("unknown method '", m, "' of ", Repr(obj).substr(0, 40)));
  }

  // A macro call: its parameters bound (positional, then by name, then defaults), its body's
  // output the value.
  json CallMacro(const Node& m, const Expr& e) {
    json scope = json::object();
    for (size_t k = 1; k < m.names.size(); ++k) {
      json v = Undefined();
      if (k < e.args.size()) v = Eval(*e.args[k]);
      for (const auto& [name, x] : e.kwargs)
        if (name == m.names[k]) v = Eval(*x);
      if (IsUndefined(v) && m.exprs[k - 1]) v = Eval(*m.exprs[k - 1]);
      scope[m.names[k]] = std::move(v);
    }
    if (++depth_ > 64) Fail(m.line, "macros nested too deep");
    scopes_.push_back(std::move(scope));
    std::string out;
    Run(*m.children[0], out);
    scopes_.pop_back();
    --depth_;
    return out;
  }

  std::vector<json> scopes_;
  std::map<std::string, const Node*> macros_;
  int depth_ = 0;
};

}  // namespace

JinjaTemplate::JinjaTemplate(std::unique_ptr<Node> root) : root_(std::move(root)) {}
JinjaTemplate::~JinjaTemplate() = default;

absl::StatusOr<std::shared_ptr<const JinjaTemplate>> JinjaTemplate::Parse(std::string_view source) {
  try {
    auto root = StmtParser(Split(source)).Run();
    return std::shared_ptr<const JinjaTemplate>(new JinjaTemplate(std::move(root)));
  } catch (const JinjaError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.what()));
  } catch (const std::exception& e) {  // std::stoll on a huge number, ...
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.what()));
  }
}

absl::StatusOr<std::string> JinjaTemplate::Render(const json& context) const {
  try {
    Renderer r(context.is_object() ? context : json::object());
    std::string out;
    r.Run(*root_, out);
    return out;
  } catch (const JinjaError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.what()));
  } catch (const LoopControl&) {
    return absl::InvalidArgumentError("chat template: break or continue outside a loop");
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.what()));
  }
}

}  // namespace amoeba
