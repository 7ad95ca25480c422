{
  "targets": [
    {
      "target_name": "scalekv",
      "sources": [
        "csrc/addon.cc",
        "csrc/engine_core.cc",
        "csrc/op_table.cc",
        "<!@(node -p \"require('fs').readdirSync('kernels/cpu').filter(f => f.endsWith('.cc')).map(f => 'kernels/cpu/' + f).join(' ')\")"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-O3", "-Wall", "-Wextra"],
      "xcode_settings": {"GCC_ENABLE_CPP_EXCEPTIONS": "YES", "CLANG_CXX_LANGUAGE_STANDARD": "c++17"},
      "variables": {"onednn%": "<!(node scripts/has-onednn.mjs)"},
      "conditions": [
        ["onednn==1", {
          "defines": ["SCALEKV_ONEDNN", "SCALEKV_OPENMP"],
          "cflags_cc": ["-fopenmp"],
          "libraries": ["-ldnnl", "-fopenmp"]
        }]
      ]
    }
  ]
}
