# cmake --install rules and the find_package(oscar) package (docs/serving.md, "Using the C++ libraries").
#   find_package(oscar CONFIG REQUIRED)   ->  oscar::formats  (bundle/safetensors/config/tokenizer readers+writers)
#                                             oscar::runtime  (only when this build had CUDA: GPU runtime + kernels)
# The libraries are static, so every dependency they were built against (also the PRIVATE ones) reaches the
# consumer's link line; oscarConfig.cmake finds each of them again with find_dependency / pkg-config.
# Headers are addressed from the install prefix's include/ exactly as in the tree ("formats/bundle.h").
include(CMakePackageConfigHelpers)

set(OSCAR_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/oscar)

# oscar::runtime drags in everything it links (lib, datasets, kernels); without CUDA only formats is published:
# a CPU-only runtime would be a library without its reason to exist.
set(OSCAR_EXPORTED_TARGETS oscar_formats)
set(OSCAR_EXPORTED_HEADER_DIRS formats)
if(OSCAR_HAVE_CUDA)
  list(APPEND OSCAR_EXPORTED_TARGETS oscar_datasets oscar_lib oscar_kernels_ref oscar_kernels oscar_runtime)
  list(APPEND OSCAR_EXPORTED_HEADER_DIRS datasets lib kernels runtime)
endif()
foreach(tgt ${OSCAR_EXPORTED_TARGETS})
  string(REGEX REPLACE "^oscar_" "" export_name ${tgt})
  set_target_properties(${tgt} PROPERTIES EXPORT_NAME ${export_name})
endforeach()

install(TARGETS ${OSCAR_EXPORTED_TARGETS} EXPORT oscarTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
foreach(dir ${OSCAR_EXPORTED_HEADER_DIRS})
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${dir}/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/${dir} COMPONENT dev
    FILES_MATCHING PATTERN "*.h" PATTERN "*.cuh" PATTERN "CMakeLists.txt" EXCLUDE)
endforeach()
install(FILES ${PROJECT_BINARY_DIR}/generated/oscar_version.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT dev)
if(TARGET oscar)
  install(TARGETS oscar RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT bin)
endif()

install(EXPORT oscarTargets NAMESPACE oscar:: DESTINATION ${OSCAR_INSTALL_CMAKEDIR} COMPONENT dev)
# Values the config needs to find the same dependencies again (paths are hints, the consumer may override them).
set(OSCAR_CONFIG_HAVE_CUDA ${OSCAR_HAVE_CUDA})
set(OSCAR_CONFIG_CUDA_ROOT "")
if(OSCAR_HAVE_CUDA AND CUDAToolkit_BIN_DIR)
  get_filename_component(OSCAR_CONFIG_CUDA_ROOT "${CUDAToolkit_BIN_DIR}" DIRECTORY)
endif()
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/oscarConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/oscarConfig.cmake INSTALL_DESTINATION ${OSCAR_INSTALL_CMAKEDIR})
# SameMinorVersion: 0.x minors may change the headers incompatibly.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/oscarConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/cmake/oscarConfig.cmake ${PROJECT_BINARY_DIR}/cmake/oscarConfigVersion.cmake
  DESTINATION ${OSCAR_INSTALL_CMAKEDIR} COMPONENT dev)

if(OSCAR_BUILD_TESTS)
  add_subdirectory(${PROJECT_SOURCE_DIR}/tests/install ${PROJECT_BINARY_DIR}/tests/install)
endif()
