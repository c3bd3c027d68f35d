"""What the tests share: commands run as users run them (`commands`, forked from `command_server`),
small encoded images (`images`), comparisons at the scale of what is compared (`numerics`), the
sharded head's test inputs (`heads`)."""
