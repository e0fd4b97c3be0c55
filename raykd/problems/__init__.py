"""Problems with reference answers: built-in synthetic tasks (tasks), files and trace datasets (sources), and
answer checking (answers). Import-light: nothing heavy is imported until a file is read."""
