// Training text for the character model: a file or a generated corpus, its train/validation
// split, and batches of (context window, next byte) pairs.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace char_lm {

// Text split into a training part and a validation part, both raw bytes.
struct Corpus {
  std::string train;
  std::string validation;
};

// T prediction tasks. Task t predicts targets[t] from the `window` bytes before it:
// context[t * window + j] is the byte j + 1 positions earlier.
struct Batch {
  int window = 0;
  std::vector<unsigned char> context;
  std::vector<unsigned char> targets;

  std::size_t size() const { return targets.size(); }
};

namespace detail {

// Picks one entry of `words` with the raw output of mt19937, whose sequence the C++ standard
// fixes, so the generated corpus is the same with every standard library (the standard
// distributions are not).
inline const char* pick(std::mt19937& generator, const std::vector<const char*>& words) {
  return words[generator() % words.size()];
}

}  // namespace detail

// Generates about `bytes` bytes of English-like sentences from a small grammar with
// subject-verb agreement, adjectives, prepositional phrases, questions and paragraph breaks.
// The same `seed` always gives the same text.
inline std::string generate_corpus(std::size_t bytes, std::uint32_t seed) {
  const std::vector<const char*> determiners = {"the", "a", "every", "one", "that", "no"};
  const std::vector<const char*> adjectives = {"small", "old", "quiet", "bright", "red", "green",
                                               "tired", "clever", "brave", "cold"};
  const std::vector<const char*> nouns = {"cat", "dog", "bird", "king", "river", "farmer",
                                          "child", "horse", "sailor", "garden", "tower", "wolf"};
  const std::vector<const char*> plural_nouns = {"cats", "dogs", "birds", "kings", "farmers",
                                                 "children", "horses", "sailors", "wolves"};
  const std::vector<const char*> verbs = {"sees", "follows", "likes", "finds", "watches",
                                          "helps", "fears", "remembers"};
  const std::vector<const char*> plural_verbs = {"see", "follow", "like", "find", "watch",
                                                 "help", "fear", "remember"};
  const std::vector<const char*> prepositions = {"near", "under", "behind", "beside", "across"};
  const std::vector<const char*> places = {"the hill", "the old bridge", "the village",
                                           "the dark forest", "the sea"};

  std::mt19937 generator(seed);
  std::string text;
  text.reserve(bytes + 200);
  bool sentence_start = true;
  int sentences_in_paragraph = 0;

  const auto append_word = [&](const std::string& word) {
    if (!sentence_start) text += ' ';
    std::string piece = word;
    if (sentence_start) piece[0] = static_cast<char>(piece[0] - 'a' + 'A');
    text += piece;
    sentence_start = false;
  };
  const auto append_noun_phrase = [&](bool plural) {
    if (plural) {
      append_word(generator() % 2 == 0 ? "the" : "some");
    } else {
      append_word(detail::pick(generator, determiners));
    }
    if (generator() % 3 == 0) append_word(detail::pick(generator, adjectives));
    append_word(detail::pick(generator, plural ? plural_nouns : nouns));
  };

  while (text.size() < bytes) {
    const bool plural_subject = generator() % 3 == 0;
    const bool question = generator() % 6 == 0;
    // verbs and plural_verbs list the two forms of each verb in the same order, so one index picks both.
    const std::size_t verb = generator() % verbs.size();
    if (question) {
      append_word(plural_subject ? "do" : "does");
      append_noun_phrase(plural_subject);
      append_word(plural_verbs[verb]);
      append_noun_phrase(generator() % 2 == 0);
      text += '?';
    } else {
      append_noun_phrase(plural_subject);
      append_word(plural_subject ? plural_verbs[verb] : verbs[verb]);
      append_noun_phrase(generator() % 2 == 0);
      if (generator() % 2 == 0) {
        append_word(detail::pick(generator, prepositions));
        append_word(detail::pick(generator, places));
      }
      text += '.';
    }
    sentence_start = true;
    if (++sentences_in_paragraph == 4 + static_cast<int>(generator() % 3)) {
      text += '\n';
      sentences_in_paragraph = 0;
    } else {
      text += ' ';
    }
  }
  return text;
}

// Reads a whole file as bytes. Throws std::runtime_error naming the path when it cannot be
// opened or read.
inline std::string read_text_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open data file '" + path + "': check the path and permissions");
  std::ostringstream contents;
  contents << file.rdbuf();
  if (file.bad()) throw std::runtime_error("failed to read data file '" + path + "'");
  return contents.str();
}

// Splits `text` into the first (1 - validation_fraction) for training and the rest for
// validation. Throws std::invalid_argument unless each part has at least window + 1 bytes, the
// length of one complete prediction task.
inline Corpus split_corpus(const std::string& text, double validation_fraction, int window) {
  const auto validation_bytes = static_cast<std::size_t>(static_cast<double>(text.size()) * validation_fraction);
  Corpus corpus;
  corpus.train = text.substr(0, text.size() - validation_bytes);
  corpus.validation = text.substr(text.size() - validation_bytes);
  const std::size_t minimum = static_cast<std::size_t>(window) + 1;
  if (corpus.train.size() < minimum || corpus.validation.size() < minimum) {
    throw std::invalid_argument("text of " + std::to_string(text.size()) + " bytes is too short: the training (" +
                                std::to_string(corpus.train.size()) + " bytes) and validation (" +
                                std::to_string(corpus.validation.size()) + " bytes) parts each need at least " +
                                std::to_string(minimum) + " bytes (context window + 1)");
  }
  return corpus;
}

namespace detail {

// Returns the number of target positions [window, text.size()) in `text`, or throws
// std::invalid_argument if there are none.
inline std::size_t target_positions(const std::string& text, int window) {
  if (window < 1 || text.size() <= static_cast<std::size_t>(window)) {
    throw std::invalid_argument("char_lm: invalid text: expected more than " + std::to_string(window) +
                                " bytes (the context window) and a window of at least 1, got " +
                                std::to_string(text.size()) + " bytes");
  }
  return text.size() - static_cast<std::size_t>(window);
}

}  // namespace detail

// Appends the task that predicts text[position] from the `window` bytes before it.
inline void append_task(Batch& batch, const std::string& text, std::size_t position) {
  for (int j = 0; j < batch.window; ++j) {
    batch.context.push_back(static_cast<unsigned char>(text[position - 1 - static_cast<std::size_t>(j)]));
  }
  batch.targets.push_back(static_cast<unsigned char>(text[position]));
}

// Draws `sequences` random runs of `length` consecutive prediction tasks from `text`, so the
// batch contains sequences * length tasks. A run that reaches the end of the text continues
// from its first valid position.
inline Batch sample_batch(const std::string& text, int window, int sequences, int length, std::mt19937& generator) {
  Batch batch;
  batch.window = window;
  const std::size_t first = static_cast<std::size_t>(window);
  const std::size_t positions = detail::target_positions(text, window);
  for (int s = 0; s < sequences; ++s) {
    const std::size_t start = generator() % positions;
    for (int i = 0; i < length; ++i) {
      append_task(batch, text, first + (start + static_cast<std::size_t>(i)) % positions);
    }
  }
  return batch;
}

// Splits the validation text into `count` fixed batches of `sequences` runs of `length` tasks,
// spread evenly over the text, so every evaluation of a run scores the same tasks.
inline std::vector<Batch> evaluation_batches(const std::string& text, int window, int sequences, int length,
                                             int count) {
  const std::size_t first = static_cast<std::size_t>(window);
  const std::size_t positions = detail::target_positions(text, window);
  const std::size_t runs = static_cast<std::size_t>(count) * static_cast<std::size_t>(sequences);
  std::vector<Batch> batches(static_cast<std::size_t>(count));
  for (std::size_t run = 0; run < runs; ++run) {
    Batch& batch = batches[run / static_cast<std::size_t>(sequences)];
    batch.window = window;
    const std::size_t start = run * positions / runs;
    for (int i = 0; i < length; ++i) {
      append_task(batch, text, first + (start + static_cast<std::size_t>(i)) % positions);
    }
  }
  return batches;
}

}  // namespace char_lm
