// The C plugin built for this machine instead of WebAssembly: this harness links with its code
// and its generated WIT bindings and calls the export the host would call, with batches built
// the way the host builds them (a copy of each record per call, which the callee owns, as in
// the canonical ABI) and each row copied out. Prints the calling thread's CPU time per record
// (best of RUNS passes after a warm-up pass) as JSON, so that sluice-bench can compare the same
// C code native and in WASM. ROWS_OUT gets the first pass's rows, one per line.
//
//   native-bench RECORDS_FILE BATCH [RUNS] [ROWS_OUT]
//
// RECORDS_FILE: one record per line, `offset \t timestamp_ms \t key \t value` (compact JSON).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "plugin.h"

// The log import (the host's logger): discarded here.
void __wasm_import_sluice_plugin_log_log(int32_t level, uint8_t *m, size_t mn, uint8_t *f, size_t fn) {
  (void)level, (void)m, (void)mn, (void)f, (void)fn;
}

static double cpu_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s RECORDS_FILE BATCH [RUNS] [ROWS_OUT]\n", argv[0]); return 2; }
  size_t batch = (size_t)atol(argv[2]);
  int runs = argc > 3 ? atoi(argv[3]) : 3;
  FILE *f = fopen(argv[1], "r");
  if (!f || batch == 0) { perror("records"); return 2; }
  // One record per line: offset \t timestamp_ms \t key \t value (compact JSON).
  size_t n = 0, cap = 1024;
  sluice_plugin_types_input_record_t *recs = malloc(cap * sizeof *recs);
  char *line = NULL;
  size_t lcap = 0;
  ssize_t len;
  static char topic[] = "bench";
  while ((len = getline(&line, &lcap, f)) > 0) {
    if (line[len - 1] == '\n') line[--len] = 0;
    char *off = strtok(line, "\t"), *ts = strtok(NULL, "\t"), *key = strtok(NULL, "\t"), *val = strtok(NULL, "");
    if (!off || !ts || !key || !val) { fprintf(stderr, "bad line %zu\n", n + 1); return 2; }
    if (n == cap) recs = realloc(recs, (cap *= 2) * sizeof *recs);
    sluice_plugin_types_input_record_t *r = &recs[n++];
    memset(r, 0, sizeof *r);
    r->key.is_some = true;
    r->key.val.len = strlen(key);
    r->key.val.ptr = (uint8_t *)strdup(key);
    r->value.len = strlen(val);
    r->value.ptr = (uint8_t *)strdup(val);
    r->source.topic.ptr = (uint8_t *)topic;
    r->source.topic.len = strlen(topic);
    r->source.partition = 0;
    r->source.offset = atoll(off);
    r->source.timestamp_ms.is_some = true;
    r->source.timestamp_ms.val = atoll(ts);
  }
  fclose(f);
  // Owned by the callee, like every argument.
  plugin_string_t config = {(uint8_t *)strdup("{\"version\":\"v1\"}"), 16}, err = {0};
  if (!exports_sluice_plugin_transform_init(&config, &err)) {
    fprintf(stderr, "init: %.*s\n", (int)err.len, (char *)err.ptr);
    return 1;
  }
  FILE *rows_out = argc > 4 ? fopen(argv[4], "w") : NULL;
  double best = 1e300;
  char *row_buf = NULL;
  size_t row_cap = 0;
  size_t rows = 0, errors = 0;
  for (int pass = 0; pass <= runs; pass++) {
    double spent = 0;
    rows = errors = 0;
    for (size_t i = 0; i < n; i += batch) {
      size_t k = n - i < batch ? n - i : batch;
      exports_sluice_plugin_transform_batch_result_t out;
      double t0 = cpu_s();
      // The callee owns its arguments (the canonical ABI): a fresh copy per call, as the host
      // copies each batch into the guest's memory.
      exports_sluice_plugin_transform_list_input_record_t in = {malloc(k * sizeof *recs), k};
      for (size_t j = 0; j < k; j++) {
        const sluice_plugin_types_input_record_t *src = &recs[i + j];
        sluice_plugin_types_input_record_t *dst = &in.ptr[j];
        *dst = *src;
        dst->key.val.ptr = malloc(src->key.val.len);
        memcpy(dst->key.val.ptr, src->key.val.ptr, src->key.val.len);
        dst->value.ptr = malloc(src->value.len);
        memcpy(dst->value.ptr, src->value.ptr, src->value.len);
        dst->source.topic.ptr = malloc(src->source.topic.len);
        memcpy(dst->source.topic.ptr, src->source.topic.ptr, src->source.topic.len);
      }
      exports_sluice_plugin_transform_process(&in, &out);
      // And copies each row out.
      for (size_t j = 0; j < out.outputs.len; j++) {
        size_t len = out.outputs.ptr[j].value.len;
        if (len > row_cap) row_buf = realloc(row_buf, row_cap = len);
        memcpy(row_buf, out.outputs.ptr[j].value.ptr, len);
      }
      spent += cpu_s() - t0;
      rows += out.outputs.len;
      errors += out.errors.len;
      if (rows_out && pass == 0)
        for (size_t j = 0; j < out.outputs.len; j++)
          fprintf(rows_out, "%.*s\n", (int)out.outputs.ptr[j].value.len, (char *)out.outputs.ptr[j].value.ptr);
      t0 = cpu_s();
      exports_sluice_plugin_transform_batch_result_free(&out);
      spent += cpu_s() - t0;
    }
    if (pass > 0 && spent < best) best = spent;  // pass 0 warms up
  }
  if (rows_out) fclose(rows_out);
  printf("{\"records\":%zu,\"rows\":%zu,\"errors\":%zu,\"us_per_record\":%.4f}\n", n, rows, errors, best * 1e6 / (double)(n ? n : 1));
  return 0;
}
// Defined by the component type object, which only the WebAssembly build links.
void __component_type_object_force_link_plugin(void) {}
