// Loader for the golden data files in tests/data, written by tools/reference/generate_golden.py.
//
// Format: lines starting with '#' are comments and blank lines are ignored. Each array is a
// header line "name rows cols" followed by rows * cols numbers in row-major order (one row per
// line in the generated files, though any whitespace separates numbers). Scalars are 1 x 1.
#pragma once

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mhc/common.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mhc::test {

// Path of a file in the golden data directory.
inline std::string golden_path(const std::string& file_name) {
  return std::string(MHC_TEST_DATA_DIR) + "/" + file_name;
}

// The named arrays of one golden data file, read in full by load(). Every error is a
// std::runtime_error whose message contains the file's path, so an uncaught one fails the
// running test with a message that names the file (and the array, where one is involved).
class GoldenFile {
 public:
  // Reads the file at `path`. Throws if it cannot be opened or is malformed.
  static GoldenFile load(const std::string& path) {
    std::ifstream stream(path);
    if (!stream) {
      throw std::runtime_error("golden file not found or unreadable: " + path +
                               " (regenerate with tools/reference/generate_golden.py)");
    }
    GoldenFile file;
    file.path_ = path;
    std::string line;
    int line_number = 0;
    while (std::getline(stream, line)) {
      ++line_number;
      if (is_blank_or_comment(line)) continue;
      file.read_array(stream, line, line_number);
    }
    return file;
  }

  const std::string& path() const { return path_; }

  // Array names in file order.
  const std::vector<std::string>& names() const { return names_; }

  bool contains(const std::string& name) const { return arrays_.count(name) != 0; }

  // The array called `name`. Throws if the file has no such array.
  const RowMatrix<double>& array(const std::string& name) const {
    const auto found = arrays_.find(name);
    if (found == arrays_.end()) {
      throw std::runtime_error("golden array '" + name + "' missing in " + path_);
    }
    return found->second;
  }

  // The array called `name` converted to Scalar, for tests that run in float.
  template <typename Scalar>
  RowMatrix<Scalar> array_as(const std::string& name) const {
    return array(name).template cast<Scalar>();
  }

  // The single value of the 1 x 1 array called `name`. Throws if it is missing or not 1 x 1.
  double scalar(const std::string& name) const {
    const RowMatrix<double>& value = array(name);
    if (value.rows() != 1 || value.cols() != 1) {
      throw std::runtime_error(detail::concat("golden array '", name, "' in ", path_,
                                              ": expected shape 1 x 1, got ", value.rows(), " x ",
                                              value.cols()));
    }
    return value(0, 0);
  }

  // The 1 x 1 array called `name` as an int. Throws unless it is an integer of magnitude below 1e9.
  int integer(const std::string& name) const {
    const double value = scalar(name);
    if (!(std::abs(value) < 1e9) || std::floor(value) != value) {
      throw std::runtime_error(detail::concat("golden array '", name, "' in ", path_,
                                              ": expected an integer, got ", value));
    }
    return static_cast<int>(value);
  }

 private:
  static bool is_blank_or_comment(const std::string& line) {
    const std::size_t first = line.find_first_not_of(" \t\r");
    return first == std::string::npos || line[first] == '#';
  }

  [[noreturn]] void fail(int line_number, const std::string& message) const {
    throw std::runtime_error(detail::concat(path_, ":", line_number, ": ", message));
  }

  // Parses `header` and reads the array's numbers from `stream`, which may span lines.
  void read_array(std::istream& stream, const std::string& header, int& line_number) {
    std::istringstream fields(header);
    std::string name;
    long rows = -1;
    long cols = -1;
    std::string extra;
    if (!(fields >> name >> rows >> cols) || (fields >> extra) || rows < 0 || cols < 0) {
      fail(line_number, "invalid array header '" + header + "': expected 'name rows cols'");
    }
    if (contains(name)) fail(line_number, "duplicate array '" + name + "'");

    RowMatrix<double> matrix(rows, cols);
    for (Eigen::Index k = 0; k < matrix.size(); ++k) {
      matrix.data()[k] = read_number(stream, name, line_number);
    }
    // The last number stops before the newline of its line, so consume the rest of that line
    // (an array without numbers ends with its header line, which getline has consumed).
    if (matrix.size() > 0) {
      std::string rest;
      std::getline(stream, rest);
      if (!is_blank_or_comment(rest)) {
        fail(line_number, detail::concat("array '", name, "' has more than ", rows, " x ", cols,
                                         " numbers: '", rest, "'"));
      }
      ++line_number;
    }
    names_.push_back(name);
    arrays_.emplace(name, std::move(matrix));
  }

  // Reads one number of array `name`, counting the newlines it skips in `line_number`.
  double read_number(std::istream& stream, const std::string& name, int& line_number) {
    while (std::isspace(stream.peek())) {
      if (stream.get() == '\n') ++line_number;
    }
    std::string token;
    if (!(stream >> token)) fail(line_number, "array '" + name + "' ends before all its numbers");

    char* end = nullptr;
    const double value = std::strtod(token.c_str(), &end);
    if (end != token.c_str() + token.size() || !std::isfinite(value)) {
      fail(line_number, "invalid number '" + token + "' in array '" + name + "'");
    }
    return value;
  }

  std::string path_;
  std::vector<std::string> names_;
  std::map<std::string, RowMatrix<double>> arrays_;
};

}  // namespace mhc::test
